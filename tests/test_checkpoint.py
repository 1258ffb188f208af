"""Atomic, rotating checkpoints: round trip, fallback to the previous file, damage detection."""
import json
import os

import pytest
import torch

from aaa_fast.checkpoint import CheckpointError, load_checkpoint, load_newest, previous_path, save_atomic, save_rotating


def test_checkpoint_round_trip_rotation_and_damage(tmp_path):
    path = str(tmp_path / "c.pt")
    save_rotating({"config_hash": "h", "x": torch.arange(5)}, path)
    save_rotating({"config_hash": "h", "x": torch.arange(6)}, path)
    assert load_checkpoint(path)["x"].numel() == 6 and load_checkpoint(previous_path(path))["x"].numel() == 5
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(path, expected_hash="other")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 3])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    assert load_newest(path)["x"].numel() == 5  # falls back to the previous one
    save_atomic({"config_hash": "h", "x": torch.arange(7)}, path)
    data = bytearray(open(path, "rb").read())
    raw = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    at = bytes(data).find(raw[len(raw) // 2:len(raw) // 2 + 32])
    data[at] ^= 0x01  # one bit inside the payload
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256|unreadable"):
        load_checkpoint(path)
    os.remove(previous_path(path))
    with pytest.raises(CheckpointError):
        load_newest(path)
    assert load_newest(str(tmp_path / "none.pt")) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path):
    from aaa_fast.checkpoint import write_json_atomic

    path = tmp_path / "final.json"
    write_json_atomic({"a": 1}, str(path))
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, str(path))  # fails half-way through the dump
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["final.json"]  # no temp left
    with pytest.raises(OSError, match="cannot write .*missing.final.json"):
        write_json_atomic({"a": 1}, str(tmp_path / "missing" / "final.json"))


def test_metrics_csv_and_plots_are_written_atomically(tmp_path):
    """The run's other files go through atomic_write too: a writer that fails half-way (here a CSV
    row the writer refuses, a figure that cannot be drawn) leaves the previous file whole."""
    import csv

    from aaa_fast.checkpoint import atomic_write
    from aaa_fast.plots import save_figure

    path = tmp_path / "metrics.csv"
    with atomic_write(str(path), newline="") as f:
        csv.DictWriter(f, fieldnames=["epoch"]).writerows([{"epoch": 1}])
    with pytest.raises(ValueError):
        with atomic_write(str(path), newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch"])
            writer.writerow({"epoch": 2})
            writer.writerow({"loss": 0.5})  # not a field: DictWriter raises ValueError
    assert path.read_text() == "1\n"

    class Broken:
        def savefig(self, f, **kw):
            f.write(b"\x89PNG half")
            raise RuntimeError("renderer failed")

    png = tmp_path / "curves.png"
    png.write_bytes(b"old plot")
    with pytest.raises(RuntimeError):
        save_figure(Broken(), str(png))
    assert png.read_bytes() == b"old plot" and sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.csv"]
