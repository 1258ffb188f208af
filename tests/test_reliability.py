"""Fault injection: killed runs, damaged checkpoints, interrupted runs (docs/RELIABILITY.md)."""
import csv
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from aaa_fast.checkpoint import load_checkpoint

from helpers import ENV, QUICK

pytestmark = pytest.mark.slow  # subprocess runs of the CLI: minutes in all

RUN = [*QUICK, "--epochs", "3", "--method", "aaa"]


def start(args, out):
    return subprocess.Popen([sys.executable, "-m", "aaa_fast.train", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(args, out, resume=True):
    res = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--out", str(out),
                          *(["--resume"] if resume else [])], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def final_of(out):
    return json.loads((out / "final.json").read_text())


def wait_for_rows(out, rows, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.csv"
        if path.exists() and path.read_text().count("\n") >= rows + 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"{out} never reached {rows} epochs")


@pytest.fixture(scope="module")
def reference_final(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("whole")
    finish([*RUN, "--data-dir", data_dir], out, resume=False)
    return final_of(out)


def test_sigkill_at_random_moments_then_resume_is_identical(tmp_path, data_dir, reference_final):
    out = tmp_path / "killed"
    args = [*RUN, "--data-dir", data_dir, "--resume"]
    rng = random.Random(1234)
    for _ in range(3):
        proc = start(args, out)
        time.sleep(rng.uniform(2.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finish(args, out, resume=False)
    assert final_of(out) == reference_final


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, data_dir, reference_final, damage):
    out = tmp_path / damage
    args = [*RUN, "--data-dir", data_dir]
    proc = start(args, out)
    wait_for_rows(out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ckpt = out / "checkpoint.pt"
    blob = bytearray(ckpt.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0x10
    ckpt.write_bytes(bytes(blob))
    res = finish(args, out)
    assert "using" in res.stderr and "checkpoint.prev.pt" in res.stderr
    assert final_of(out) == reference_final


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_mid_epoch_checkpoint_and_resume_is_identical(tmp_path, data_dir, reference_final, sig):
    out = tmp_path / sig.name
    args = [*RUN, "--data-dir", data_dir]
    proc = start(args, out)
    wait_for_rows(out, 1)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # the run had already finished: nothing was interrupted
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "checkpoint written" in err, err[-2000:]
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["position"] is not None and state["position"]["step"] >= 1
    finish(args, out)
    assert final_of(out) == reference_final


def test_diverging_run_stops_with_a_message_or_skips(tmp_path, data_dir):
    """A learning rate of 1e30 makes the loss non-finite within a few steps."""
    args = [*QUICK, "--data-dir", data_dir, "--method", "erm", "--lr", "1e30"]
    res = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--out", str(tmp_path / "stop")],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "non-finite training" in res.stderr and "training stopped" in res.stderr
    assert "checkpoint" in res.stderr  # names the last good checkpoint (or says there is none yet)
    res = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--skip-nonfinite",
                          "--out", str(tmp_path / "skip")], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(tmp_path / "skip" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["skipped"]) > 0  # the "skipped" column counts the skipped steps
