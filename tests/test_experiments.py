"""experiments/grid.py (the study CLI's local executor, serial) and aaa_fast.study.report: the grid runs every cell once through the CLI,
skips finished runs, refuses results from other arguments; the report's numbers match values
computed by hand from known final.json files."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from aaa_fast.study import grid as grid_mod, report, runner
from aaa_fast.study.__main__ import main as study_main

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_config(path, out, data_dir, methods=None):
    cfg = {"out": str(out), "seeds": [0, 1],
           "common": ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--epochs", "1",
                      "--batch-size", "64", "--steps", "1", "--num-meta", "50", "--meta-batch-size", "20",
                      "--eval-steps", "2", "--eval-subset", "20", "--test-subset", "50", "--device", "cpu"],
           "scenarios": {"flip": ["--label-noise", "flip2", "--noise-rate", "0.2"]},
           "methods": methods or {"ERM": ["--method", "erm"], "AAA": ["--method", "aaa", "--meta-every", "2"]}}
    path.write_text(json.dumps(cfg))
    return str(path)


def run_grid(config, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "grid.py"), config, *extra],
                          capture_output=True, text=True, env=ENV, timeout=600)


def test_grid_runs_each_cell_once_and_skips_finished_runs(tmp_path, data_dir):
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir)
    dry = run_grid(config, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("-m aaa_fast.train") == 4
    assert not (tmp_path / "res").exists()

    first = run_grid(config)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 to run" in first.stdout
    for seed in (0, 1):
        for method in ("ERM", "AAA"):
            run = tmp_path / "res" / "flip" / method / f"seed{seed}"
            final = json.loads((run / "final.json").read_text())
            assert final["method"] == method.lower() and final["scenario"]["seed"] == seed
            assert sum(final["scenario"]["class_counts"]) == final["scenario"]["train_size"]
            assert not (run / "checkpoint.pt").exists()  # deleted once the run finished
            assert "--seed" in json.loads((run / "run.json").read_text())["command"]
    stamp = os.path.getmtime(tmp_path / "res" / "flip" / "AAA" / "seed1" / "final.json")

    again = run_grid(config)
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert os.path.getmtime(tmp_path / "res" / "flip" / "AAA" / "seed1" / "final.json") == stamp

    # the config now gives other arguments for a finished run: refuse rather than mix results
    write_config(tmp_path / "g.json", tmp_path / "res", data_dir,
                 methods={"ERM": ["--method", "erm", "--lr", "0.05"], "AAA": ["--method", "aaa", "--meta-every", "2"]})
    changed = run_grid(config)
    assert changed.returncode != 0 and "other arguments" in changed.stderr


def test_grid_keeps_final_weights_that_reproduce_the_run(tmp_path, data_dir):
    """keep_weights: model.pt survives the checkpoints' deletion and re-evaluates to final.json."""
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir, methods={"ERM": ["--method", "erm"]})
    cfg = json.loads(open(config).read())
    cfg.update(keep_weights=True, seeds=[0])
    open(config, "w").write(json.dumps(cfg))
    assert run_grid(config).returncode == 0
    run = tmp_path / "res" / "flip" / "ERM" / "seed0"
    assert (run / "model.pt").exists() and not (run / "checkpoint.pt").exists()
    ev = subprocess.run([sys.executable, "-m", "aaa_fast.evaluate", "--checkpoint", str(run / "model.pt"),
                         "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, env=ENV, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    final, again = (json.loads(open(p).read()) for p in (run / "final.json", tmp_path / "eval.json"))
    assert (again["clean_acc"], again["pgd_acc"]) == (final["clean_acc"], final["pgd_acc"])

    # experiments/evaluate_grid.py: the config's evaluation of every run from its model.pt, once
    cfg["evaluation"] = {"name": "eval_x", "test_subset": 50, "autoattack": "fast", "standard": []}
    open(config, "w").write(json.dumps(cfg))
    script = [sys.executable, os.path.join(ROOT, "experiments", "evaluate_grid.py"), config]
    first = subprocess.run(script, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0 and "flip ERM seed 0: done" in first.stdout, first.stdout + first.stderr
    ev = json.loads((run / "eval_x.json").read_text())
    assert ev["aa_version"] == "fast" and ev["eval_dtype"] == "float32" and ev["test_images"] == 50
    assert ev["pgd_acc"] == final["pgd_acc"]  # the run's own test subset and seeds
    again = subprocess.run(script, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and "done" not in again.stdout  # evaluated already: skipped


def wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_grid_stopped_mid_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir, how):
    methods = {"AAA": ["--method", "aaa", "--meta-every", "2", "--epochs", "3"]}
    whole = write_config(tmp_path / "whole.json", tmp_path / "whole", data_dir, methods)
    assert run_grid(whole, "--seeds", "0").returncode == 0
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir, methods)
    run = tmp_path / "res" / "flip" / "AAA" / "seed0"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "grid.py"), config, "--seeds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(run / "metrics.csv", proc)  # the first epoch is done
    if how == "SIGINT":  # to the runner alone, as from a job manager; it forwards it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130 and "interrupted; rerun to continue" in proc.stdout.read()
    else:  # the runner dies; its run is told to stop (SIGTERM) instead of running on as an orphan
        proc.kill()
        proc.wait()
        deadline = time.time() + 300
        while "checkpoint written" not in (run / "train.log").read_text():  # the CLI's signal-stop message
            assert time.time() < deadline, f"the run did not stop after its runner died:\n{(run / 'train.log').read_text()}"
            time.sleep(0.05)
    assert not (run / "final.json").exists()
    again = run_grid(config, "--seeds", "0")
    assert again.returncode == 0 and "1 to run" in again.stdout
    assert json.loads((run / "final.json").read_text()) == json.loads(
        (tmp_path / "whole" / "flip" / "AAA" / "seed0" / "final.json").read_text())


@pytest.mark.parametrize("rc", [0, 1], ids=["finished", "failed"])
def test_grid_stops_after_a_run_that_ended_despite_a_signal(tmp_path, data_dir, monkeypatch, capsys, rc):
    """A run may finish (exit 0) or fail though the signal reached it (it ignored it, or it came
    during its final evaluation): the study stops all the same instead of starting the next run."""
    real_launch = runner.launch

    def ends_though_signalled(cmd, log):
        out = cmd[cmd.index("--out") + 1]
        final = json.dumps(fake_final((10, 20), (5, 10), [85] * 10)) if rc == 0 else None
        script = ("import os, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "os.kill(os.getppid(), signal.SIGINT); time.sleep(0.5); "
                  + (f"open({os.path.join(out, 'final.json')!r}, 'w').write({final!r}); " if final else "")
                  + f"sys.exit({rc})")
        return real_launch([sys.executable, "-c", script], log)

    monkeypatch.setattr(runner, "launch", ends_though_signalled)
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir)
    assert study_main(["run", config, "--executor", "local", "--max-retries", "0"]) == 130
    assert "interrupted; rerun to continue" in capsys.readouterr().out
    done = [d for d in (tmp_path / "res" / "flip").glob("*/seed*") if (d / "run.json").exists()]
    assert len(done) == (1 if rc == 0 else 0)  # a finished run counts, a failed one does not
    assert len(list((tmp_path / "res" / "flip").glob("*/seed*"))) == 1  # the next run never started


def test_grid_rejects_bad_configs_and_names(tmp_path, data_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"out": "x", "seeds": [0], "common": [], "scenarios": [], "methods": {}}))
    res = run_grid(str(bad))
    assert res.returncode != 0 and "'scenarios' must be a dict" in res.stderr
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir)
    res = run_grid(config, "--methods", "PGD")
    assert res.returncode != 0 and "unknown methods ['PGD']" in res.stderr
    (tmp_path / "broken.json").write_text("{")
    assert "cannot read grid config" in run_grid(str(tmp_path / "broken.json")).stderr
    twice = tmp_path / "twice.json"  # two methods of one name: json.load would keep only the second
    twice.write_text('{"out": "x", "seeds": [0], "common": [], "scenarios": {"s": []}, '
                     '"methods": {"TRADES": ["--method", "trades"], "TRADES": ["--method", "frl"]}}')
    res = run_grid(str(twice))
    assert res.returncode != 0 and "'TRADES' is given twice in one object" in res.stderr


def test_hot_start_stage_is_shared_and_methods_can_be_limited_to_scenarios(tmp_path, data_dir):
    """A pretraining stage runs once per (scenario, seed) and keeps its checkpoint; the hot-start
    method fine-tunes from exactly those weights; a method limited to one scenario runs only there."""
    import torch

    from aaa_fast.checkpoint import load_checkpoint

    methods = {"Pre": ["--method", "trades", "--lam", "6"],
               "Hot": {"args": ["--method", "frl", "--lr", "0.01"], "init_from": "Pre"},
               "Oracle": {"args": ["--method", "aaa-oracle"], "scenarios": ["flip"]}}
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir, methods)
    grid = json.loads(open(config).read())
    grid["seeds"] = [0]
    grid["scenarios"]["clean"] = []
    open(config, "w").write(json.dumps(grid))
    res = run_grid(config)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 to run" in res.stdout  # Pre and Hot in both scenarios, Oracle in flip only
    assert not (tmp_path / "res" / "clean" / "Oracle").exists()
    for scenario in ("flip", "clean"):
        pre = tmp_path / "res" / scenario / "Pre" / "seed0"
        assert (pre / "checkpoint.pt").exists() and not (pre / "best.pt").exists()
        hot = tmp_path / "res" / scenario / "Hot" / "seed0"
        command = json.loads((hot / "run.json").read_text())["command"]
        assert command[command.index("--init") + 1] == str(pre / "checkpoint.pt")
        assert not (hot / "checkpoint.pt").exists()
    # the fine-tune really started from the stage's weights: 0 epochs of training would give them back
    from aaa_fast.run import train
    from aaa_fast.train import build_parser, resolve_defaults

    args = build_parser().parse_args([*grid["common"], *grid["scenarios"]["flip"], "--method", "frl", "--epochs", "1",
                                      "--lr", "1e-12", "--momentum", "0", "--weight-decay", "0", "--init",
                                      str(tmp_path / "res" / "flip" / "Pre" / "seed0" / "checkpoint.pt"),
                                      "--out", str(tmp_path / "tiny-lr"), "--progress", "lines"])
    train(resolve_defaults(args))
    start = load_checkpoint(str(tmp_path / "res" / "flip" / "Pre" / "seed0" / "checkpoint.pt"))["trainer"]["model"]
    after = load_checkpoint(str(tmp_path / "tiny-lr" / "checkpoint.pt"))["trainer"]["model"]
    for key, value in start.items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(after[key], value, atol=1e-8, rtol=0)


@pytest.mark.parametrize("methods, message", [
    ({"A": {"args": ["--method", "erm"], "init_from": "B"}, "B": ["--method", "erm"]}, "must be another method listed before"),
    ({"A": {"args": ["--method", "erm"], "scenarios": ["nope"]}}, "unknown scenarios ['nope']"),
    ({"A": {"method": "erm"}}, "must be a list of arguments or a dict with 'args'"),
])
def test_grid_rejects_bad_method_entries(tmp_path, data_dir, methods, message):
    config = write_config(tmp_path / "g.json", tmp_path / "res", data_dir, methods)
    res = run_grid(config, "--dry-run")
    assert res.returncode != 0 and message in res.stderr


GOOD = {"out": "x", "seeds": [0], "common": [], "scenarios": {"s": []}, "methods": {"A": ["--method", "erm"]}}


@pytest.mark.parametrize("change, message", [
    ({"methods": {"../../escaped": []}}, "method name '../../escaped' must be a plain directory name"),
    ({"scenarios": {"a/b": []}}, "scenario name 'a/b' must be a plain directory name"),
    ({"scenarios": {"s": "--label-noise uniform"}}, "scenario 's' must be a list of strings"),
    ({"seeds": [0, 0]}, "'seeds' must be distinct integers >= 0"),
    ({"seeds": [True]}, "'seeds' must be distinct integers >= 0"),
    ({"common": ["--epochs", 2]}, "'common' must be a list of strings"),
    ({"methods": {"A": {"args": [], "scenarios": "s"}}}, "'scenarios' must be a list of scenario names"),
    ({"methods": {"A": {"args": [], "init_from": "A"}}}, "must be another method listed before it"),
    ({"paired": [["A", "B"]]}, "'paired' must be a list of [A, B] pairs of two different methods"),
    ({"paired": [["A", "A"]]}, "'paired' must be a list of [A, B] pairs of two different methods"),
    ({"paired": ["A"]}, "'paired' must be a list of [A, B] pairs of two different methods"),
])
def test_grid_config_values_are_checked(tmp_path, change, message):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(SystemExit) as stop:
        grid_mod.load_grid(str(path))
    assert message in str(stop.value.code)


@pytest.mark.parametrize("content", ["{", "[1]", "{}"])
def test_a_damaged_run_json_is_named(tmp_path, content):
    run = tmp_path / "x" / "s" / "A" / "seed0"
    run.mkdir(parents=True)
    (run / "final.json").write_text("{}")
    (run / "run.json").write_text(content)
    grid = {**GOOD, "out": str(tmp_path / "x")}
    with pytest.raises(SystemExit) as stop:
        grid_mod.finished(grid, 0, "s", "A")
    assert f"{run / 'run.json'} is damaged" in str(stop.value.code)


def test_report_refuses_missing_documents_before_any_work(tmp_path):
    config = tmp_path / "g.json"
    config.write_text(json.dumps(GOOD))
    (tmp_path / "file").write_text("")
    for argv, message in (([str(config), "--markdown", str(tmp_path / "new.md")], "no such file"),
                          ([str(config), "--markdown", str(tmp_path)], "no such file"),
                          ([str(config), "--figures", str(tmp_path / "file")], "is a file, not a directory")):
        with pytest.raises(SystemExit) as stop:
            report.main(argv)
        assert message in str(stop.value.code)


def fake_final(nat, bdy, classwise_pgd):
    """A final.json with the fields the report reads; robust error = natural + boundary."""
    return {"avg_nat_err": nat[0], "worst_nat_err": nat[1], "avg_bdy_err": bdy[0], "worst_bdy_err": bdy[1],
            "avg_rob_err": nat[0] + bdy[0], "worst_rob_err": nat[1] + bdy[1], "clean_acc": 100 - nat[0],
            "pgd_acc": 100 - nat[0] - bdy[0], "classwise_pgd_acc": classwise_pgd}


@pytest.fixture
def finished_grid(tmp_path):
    cfg = {"out": str(tmp_path / "res" / "toy"), "seeds": [0, 1, 2], "common": [],
           "scenarios": {"clean": [], "noisy": ["--label-noise", "uniform"]},
           "methods": {"ERM": ["--method", "erm"], "TRADES": ["--method", "trades"], "FRL": ["--method", "frl"],
                       "AAA-meta": ["--method", "aaa"]}}
    (tmp_path / "toy.json").write_text(json.dumps(cfg))
    values = {  # (scenario, method): avg natural error of seeds 0, 1, 2 (other fields derived)
        ("clean", "ERM"): [10, 12, 14], ("clean", "TRADES"): [20, 22, 24], ("clean", "FRL"): [21, 21, 21],
        ("clean", "AAA-meta"): [18, 19, 20], ("noisy", "ERM"): [30, 30, 30], ("noisy", "TRADES"): [40, 41, 42]}
    for (sc, m), nats in values.items():
        for seed, nat in enumerate(nats):
            run = tmp_path / "res" / "toy" / sc / m / f"seed{seed}"
            run.mkdir(parents=True)
            bdy = 50 if m == "ERM" else 20 + seed
            (run / "final.json").write_text(json.dumps(
                fake_final((nat, nat + 10), (bdy, bdy + 5), [100 - nat - bdy] * 10)))
            (run / "run.json").write_text(json.dumps({"command": [], "seconds": 20}))
            if m == "AAA-meta":  # share of b > a: first epoch 0.9, 0.5, 1.0; last 0.1, 0.2, 0.3
                (run / "metrics.csv").write_text(f"epoch,frac_anti,mean_eps\n1,{[0.9, 0.5, 1.0][seed]},0.5\n"
                                                 f"2,{0.1 * (seed + 1)},{0.1 + 0.01 * seed}\n")
    return str(tmp_path / "toy.json")


def test_report_names_damaged_runs_and_reports_the_rest(finished_grid, tmp_path, capsys):
    root = tmp_path / "res" / "toy"
    (root / "clean" / "TRADES" / "seed0" / "final.json").write_text('{"avg_nat_err": 2')  # truncated
    (root / "clean" / "TRADES" / "seed1" / "final.json").write_text('{"clean_acc": 80.0}')  # no figures
    (root / "clean" / "FRL" / "seed0" / "run.json").write_bytes(b"\xff\xfe")  # not text
    (root / "clean" / "AAA-meta" / "seed0" / "metrics.csv").write_bytes(b"epoch,frac_anti\n\x00\xff\n")
    frl = root / "clean" / "FRL" / "seed1" / "final.json"
    frl.write_text(json.dumps(dict(json.loads(frl.read_text()), worst_rob_err=float("nan"))))  # counted as nan before
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- grid:toy begin -->\n<!-- grid:toy end -->\n")
    assert report.main([finished_grid, "--markdown", str(doc)]) == 0
    text = doc.read_text()
    trades = next(line for line in text.splitlines() if line.startswith("| TRADES |"))
    assert trades.startswith("| TRADES | 24.0 |")  # seed 2 alone (its natural error 24)
    assert "**Damaged runs, not counted**" in text
    for name, reason in [("clean/TRADES/seed0/final.json", "JSONDecodeError"),
                         ("clean/TRADES/seed1/final.json", "no finite avg_nat_err"),
                         ("clean/FRL/seed1/final.json", "no finite worst_rob_err"),
                         ("clean/FRL/seed0/run.json", "UnicodeDecodeError")]:
        assert name in text and reason in text.split(name, 1)[1].split("`")[0], name
    assert "damaged run file" in capsys.readouterr().err


def test_report_tables_match_hand_computed_statistics(finished_grid, tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# head\n<!-- grid:toy begin -->\nold numbers\n<!-- grid:toy end -->\ntail\n")
    assert report.main([finished_grid, "--markdown", str(doc), "--figures", str(tmp_path / "fig")]) == 0
    text = doc.read_text()
    assert text.startswith("# head\n<!-- grid:toy begin -->\n") and text.endswith("<!-- grid:toy end -->\ntail\n")
    assert "old numbers" not in text and "18 of 24 runs finished, 6 min of runner wall time in all." in text
    lines = text.splitlines()
    # clean/TRADES: natural errors 20, 22, 24 -> 22.0 ± 2.0; boundary 20, 21, 22 -> 21.0 ± 1.0, the
    # best boundary error together with FRL and AAA-meta (ties are all bold)
    trades = next(line for line in lines if line.startswith("| TRADES |"))
    assert trades == ("| TRADES | 22.0 ± 2.0 | 32.0 ± 2.0 | **21.0 ± 1.0** | **26.0 ± 1.0** | 43.0 ± 3.0 "
                      "| 58.0 ± 3.0 | 3 |")
    erm = next(line for line in lines if line.startswith("| ERM |"))
    assert erm.startswith("| ERM | **12.0 ± 2.0** |")  # best natural error in the clean table
    # AAA-meta vs best adversarial baseline (FRL 21 ± 0 beats TRADES 22) on avg nat: 19 - 21 = -2,
    # standard error sqrt(1^2/3 + 0^2/3)
    clean_vs = next(line for line in lines if line.startswith("| clean |"))
    assert f"-2.0 ± {math.sqrt(1 / 3):.1f} (AAA-meta vs FRL)" in clean_vs
    assert next(line for line in lines if line.startswith("| noisy |")).count("–") == 4  # no AAA run there
    assert "| clean | 80% (50–100%) → 20.0% / 0.1100 |" in lines and "| noisy | – |" in lines  # meta-network's choices
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- grid:toy:headline begin -->\n<!-- grid:toy:headline end -->\nb\n")
    report.main([finished_grid, "--markdown", str(readme)])
    short = readme.read_text()
    assert clean_vs in short.splitlines() and "| TRADES |" not in short and short.endswith("end -->\nb\n")
    assert (tmp_path / "fig" / "toy_classwise_robust_error.png").stat().st_size > 0
    assert (tmp_path / "fig" / "toy_natural_vs_robust.png").stat().st_size > 0
    summary = (tmp_path / "res" / "toy" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("scenario,method,seeds,avg_nat_err_mean,avg_nat_err_std")
    assert any(row.startswith("clean,TRADES,3,22.0000,2.0000,32.0000,2.0000,21.0000,1.0000") for row in summary)


def test_report_headline_picks_only_the_versus_variants(finished_grid, tmp_path):
    # an AAA variant at a smaller lambda has the lowest natural error; "versus" keeps it out of the
    # best-minus-best table (it would win the natural columns by giving up robustness), not out of
    # the per-scenario table
    cfg = grid_mod.load_grid(finished_grid)
    cfg["methods"]["AAA-low-lam"] = ["--method", "aaa", "--lam", "0.5"]
    cfg["report"] = {"aaa": ["AAA-meta", "AAA-low-lam"], "versus": ["AAA-meta"], "baselines": ["TRADES", "FRL"]}
    (tmp_path / "toy.json").write_text(json.dumps(cfg))
    for seed in range(3):
        run = tmp_path / "res" / "toy" / "clean" / "AAA-low-lam" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "final.json").write_text(json.dumps(fake_final((5, 15), (40, 45), [55] * 10)))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- grid:toy begin -->\n<!-- grid:toy end -->\n")
    report.main([str(tmp_path / "toy.json"), "--markdown", str(doc)])
    lines = doc.read_text().splitlines()
    assert any(line.startswith("**Best AAA variant minus best adversarial baseline** (AAA-meta against TRADES, FRL;")
               for line in lines)
    clean_vs = next(line for line in lines if line.startswith("| clean |"))
    assert f"-2.0 ± {math.sqrt(1 / 3):.1f} (AAA-meta vs FRL)" in clean_vs and "AAA-low-lam" not in clean_vs
    assert any(line.startswith("| AAA-low-lam | **5.0 ± 0.0** |") for line in lines)


def test_report_one_seed_cells_show_no_spread():
    # a cell with one finished seed has no standard deviation: the tables print its mean alone and
    # give a difference against it no error estimate, instead of a "± 0.0" that claims certainty
    one, three = {k: (30.0, 0.0, 1) for k, _ in report.METRICS}, {k: (28.0, 2.0, 3) for k, _ in report.METRICS}
    agg = {("s", "A"): three, ("s", "B"): one, ("s", "C"): three}
    table = report.scenario_table("s", ["A", "B"], agg)
    assert table[3] == "| B | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 | 1 |"
    assert table[2].startswith("| A | **28.0 ± 2.0** |")
    versus = report.versus_table(["s"], ["A"], ["B"], agg)[2]
    assert versus == "| s | " + " | ".join(["-2.0 (A vs B, one seed)"] * len(report.HEADLINE)) + " |"
    se = math.sqrt(2 * 4 / 3)
    assert report.versus_table(["s"], ["A"], ["C"], agg)[2].startswith(f"| s | +0.0 ± {se:.1f} (A vs C) |")


def test_report_roles_and_mechanism_table_by_hand():
    grid = {"methods": {"TRADES": ["--method", "trades"], "AAA": ["--method", "aaa"],
                        "Oracle": {"args": ["--method", "aaa-oracle"]}, "ERM": ["--method", "erm"]},
            "report": {"aaa": ["AAA"], "baselines": ["TRADES"], "controls": ["Oracle"]}}
    assert report.roles(grid) == {"aaa": ["AAA"], "versus": ["AAA"], "baselines": ["TRADES"],
                                  "controls": ["Oracle"]}
    # without a "report" entry: the role of the method each runs (the registry's)
    assert report.roles({"methods": grid["methods"]}) == {"aaa": ["AAA"], "versus": ["AAA"],
                                                          "baselines": ["TRADES"], "controls": ["Oracle"]}

    def last(corrupted, clean, auroc, band):
        return {"last_epoch": {"anti_share_corrupted": corrupted, "anti_share_clean": clean,
                               "anti_auroc_corrupted": auroc, "anti_share_tail": "", "anti_share_head": "",
                               "grad_band": band}}

    runs = {("noisy", "AAA"): [last("0.9", "0.1", "0.95", "0.8"), last("0.7", "0.3", "0.85", "0.6")],
            ("clean", "AAA"): [last("", "", "", "1.0")]}
    lines = report.mechanism_table(["noisy", "clean"], ["AAA", "Oracle"], runs)
    assert lines[2:] == ["| noisy | AAA | 0.80 | 0.20 | 0.90 | – | – | 0.70 |"]  # clean: no group, no row


def test_report_paired_table_by_hand():
    # A minus B seed by seed; seed 3 of A has no partner and is left out. avg nat: A 20, 23, 21,
    # B 19, 20, 21 -> differences 1, 3, 0: mean 4/3, sd sqrt(((-1/3)^2 + (5/3)^2 + (4/3)^2) / 2),
    # se = sd / sqrt(3); t(2) = 4.30 * se > 4/3, so within noise. worst rob: every seed +10 on a
    # spread of 1.0 -> se 0, beyond noise.
    def final(seed, nat, worst_rob, seconds, rows=None):
        f = {"seed": seed, "avg_nat_err": nat, "worst_nat_err": 30.0, "avg_rob_err": 40.0 + seed,
             "worst_rob_err": worst_rob, "seconds": seconds}
        if rows is not None:
            f["epochs"] = [{"rows_attacked": rows, "dropped_share": "0.01"}, {"rows_attacked": rows, "dropped_share": ""}]
        return f

    runs = {("s", "A"): [final(0, 20, 61, 100, "0.5"), final(1, 23, 62, 100, "0.6"), final(2, 21, 63, 50, "0.7"),
                         final(3, 99, 99, 1)],
            ("s", "B"): [final(0, 19, 51, 150), final(1, 20, 52, 200), final(2, 21, 53, 100)]}
    lines = report.paired_table(["s", "other"], [["A", "B"]], runs)
    assert len(lines) == 3 and lines[2].startswith("| s | A − B | 3 | ")
    cells = lines[2].split(" | ")[3:]
    sd = math.sqrt(((1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (0 - 4 / 3) ** 2) / 2)
    assert cells[0] == f"+1.3 ± {sd / math.sqrt(3):.1f} (spread 1.0)"
    assert cells[1] == "+0.0 ± 0.0 (spread 0.0)"  # equal everywhere: no shift, nothing beyond noise
    assert cells[2] == "+0.0 ± 0.0 (spread 1.0)"
    assert cells[3] == "+10.0 ± 0.0 (spread 1.0) **beyond noise**"
    assert cells[4] == f"{(1.5 + 2 + 2) / 3:.2f}×"  # B's seconds over A's, per seed
    assert cells[5] == "60.0%, 1.00% |"  # rows attacked 0.5/0.6/0.7; dropped share only where measured
    one = report.paired_table(["s"], [["A", "B"]], {("s", "A"): runs["s", "A"][:1], ("s", "B"): runs["s", "B"]})
    assert "+1.0 (one seed)" in one[2]


def test_report_of_a_paired_grid_heads_with_the_paired_table(finished_grid, tmp_path):
    # a grid of two arms and no baselines (experiments/fmnist_skip.json): no best-minus-best table
    # with empty cells; the paired comparison is the headline
    cfg = grid_mod.load_grid(finished_grid)
    cfg["report"] = {"aaa": ["AAA-meta"], "baselines": []}
    cfg["paired"] = [["AAA-meta", "FRL"]]
    (tmp_path / "toy.json").write_text(json.dumps(cfg))
    doc = tmp_path / "README.md"
    doc.write_text("<!-- grid:toy:headline begin -->\n<!-- grid:toy:headline end -->\n")
    report.main([str(tmp_path / "toy.json"), "--markdown", str(doc)])
    text = doc.read_text()
    assert "Best AAA variant minus" not in text and "Controls minus" not in text
    # clean, avg nat: AAA-meta 18, 19, 20 minus FRL 21, 21, 21 -> -3, -2, -1: mean -2, se 1/sqrt(3),
    # whose 95% t-interval (4.30 se = 2.5) holds 0
    row = next(line for line in text.splitlines() if line.startswith("| clean | AAA-meta − FRL | 3 |"))
    assert row.startswith("| clean | AAA-meta − FRL | 3 | -2.0 ± 0.6 (spread 0.0) |") and "beyond" not in row
    assert row.endswith("| 1.00× | – |")


def load_script(name: str):
    """One of experiments/*.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_weights_reads_the_run_and_counts_kept_rows(tmp_path, data_dir, capsys):
    """experiments/row_weights.py on a real checkpoint: the paper objective keeps both copies of a
    row only where min(a_i, b_i) >= tau, so tau = 0.5 keeps exactly one copy of every row (50%)
    and a tau below every weight keeps them all; the weights are those the meta-network gives."""
    import torch

    from aaa_fast.run import train
    from aaa_fast.train import build_parser, resolve_defaults

    argv = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--epochs", "1",
            "--batch-size", "64", "--steps", "1", "--num-meta", "50", "--meta-batch-size", "20", "--eval-steps", "2",
            "--eval-subset", "20", "--test-subset", "50", "--device", "cpu", "--label-noise", "uniform",
            "--noise-rate", "0.4", "--method", "aaa", "--objective", "paper", "--meta-every", "2",
            "--out", str(tmp_path / "run"), "--progress", "lines"]
    train(resolve_defaults(build_parser().parse_args(argv)))
    rw = load_script("row_weights")
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    a, b, corrupted, paper = rw.row_weights(checkpoint, argv)
    assert paper and a.shape == b.shape == corrupted.shape == (250,) and 0 < int(corrupted.sum()) < 250
    torch.testing.assert_close(a + b, torch.ones_like(a))  # the softmax's two weights
    assert rw.kept(a, b, 0.5, True)[0] == 0.5 and rw.kept(a, b, 0.5, False)[0] == 1 - (b < 0.5).double().mean().item() / 2
    low = float(torch.minimum(a, b).min()) / 2
    assert rw.kept(a, b, low, True) == (1.0, 0.0)
    tau = float(torch.minimum(a, b).median())
    attacked, left_out = rw.kept(a, b, tau, True)
    lo = torch.minimum(a, b).double()
    assert attacked == 1 - (lo < tau).double().mean().item() / 2
    assert math.isclose(left_out, (lo * (lo < tau)).mean().item(), rel_tol=1e-12)
    assert rw.main(["--checkpoint", checkpoint, "--tau", "0.5", "--", *argv]) == 0
    out = capsys.readouterr().out
    assert f"250 training rows ({int(corrupted.sum())} with corrupted labels), paper objective" in out
    assert out.splitlines()[-1].startswith("0.5        50.0%")


def test_first_steps_are_the_runs_steps(tmp_path, data_dir, capsys):
    """experiments/first_steps.py against the CLI's own run of the same command: over a whole
    epoch its step losses average to metrics.csv's epoch loss and its weights digest is that of
    the run's checkpoint; a run.json command is taken as it is (its --out, --resume and --progress
    dropped); the same command twice prints the same lines."""
    import csv

    from aaa_fast.checkpoint import load_checkpoint
    from aaa_fast.run import train
    from aaa_fast.train import build_parser, resolve_defaults

    fs = load_script("first_steps")
    argv = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--epochs", "1",
            "--batch-size", "64", "--steps", "1", "--num-meta", "50", "--meta-batch-size", "20", "--eval-steps", "2",
            "--eval-subset", "20", "--test-subset", "50", "--device", "cpu", "--label-noise", "uniform",
            "--noise-rate", "0.4", "--method", "aaa", "--objective", "paper", "--meta-every", "2"]
    out = tmp_path / "run"
    train(resolve_defaults(build_parser().parse_args([*argv, "--out", str(out), "--progress", "lines"])))
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    steps = 4  # 250 training rows in batches of 64
    taken, digest = fs.first_steps(["-m", "aaa_fast.train", *argv, "--out", "elsewhere", "--resume",
                                    "--progress", "bar"], steps)
    assert len(taken) == steps
    assert math.isclose(sum(loss for loss, _ in taken) / steps, float(row["loss"]), rel_tol=1e-9)
    assert math.isclose(sum(anti for _, anti in taken) / steps, float(row["frac_anti"]), rel_tol=1e-9)
    assert digest == fs.weights_digest(load_checkpoint(str(out / "checkpoint.pt"))["trainer"]["model"])
    assert fs.main(["--steps", "2", "--", *argv]) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert fs.main(["--steps", "2", "--", *argv]) == 0
    assert first == [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert first[0] == f"step 1: loss {taken[0][0]!r}, anti share {taken[0][1]!r}"
    with pytest.raises(SystemExit, match="--steps must be between 1 and the run's 4"):
        fs.first_steps(argv, 5)


def test_report_needs_markers_and_results(finished_grid, tmp_path):
    doc = tmp_path / "plain.md"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.main([finished_grid, "--markdown", str(doc)])
    assert doc.read_text() == "no markers\n"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**grid_mod.load_grid(finished_grid), "out": str(tmp_path / "nothing")}))
    with pytest.raises(SystemExit, match="no finished runs"):
        report.main([str(empty)])


CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".json"))


@pytest.mark.parametrize("config", CONFIGS)
def test_committed_grid_configs_give_valid_training_commands(config):
    from aaa_fast.train import build_parser, resolve_defaults

    grid = grid_mod.load_grid(os.path.join(ROOT, "experiments", config))
    assert len(grid["seeds"]) >= 1 and len(set(grid["seeds"])) == len(grid["seeds"])
    for scenario in grid["scenarios"]:
        for method in grid["methods"]:
            if not grid_mod.runs_in(grid, scenario, method):
                continue
            cmd = grid_mod.command(grid, scenario, method, grid["seeds"][0])
            args = resolve_defaults(build_parser().parse_args(cmd[3:]))  # after python -m aaa_fast.train
            spec = grid_mod.method_spec(grid, method)
            assert args.method == spec["args"][spec["args"].index("--method") + 1]
            assert args.out.endswith(f"{method}/seed{grid['seeds'][0]}")


def test_report_puts_pgd_and_autoattack_side_by_side(finished_grid, tmp_path):
    """An "evaluation" section: per run PGD vs AutoAttack (fast: after APGD-T; standard where it
    ran) with the gap, the best-minus-best ranking under each attack, the masking verdict;
    every number hand-computed from hand-built evaluation files."""
    cfg = grid_mod.load_grid(finished_grid)
    cfg.update(seeds=[0], evaluation={"name": "ev", "test_subset": 1000, "autoattack": "fast",
                                      "standard": [["clean", "TRADES"]]},
               report={"aaa": ["AAA-meta"], "versus": ["AAA-meta"], "baselines": ["TRADES", "FRL"]})
    (tmp_path / "toy.json").write_text(json.dumps(cfg))

    def ev(avg_pgd, worst_pgd, fast_classwise, std=None):
        out = {"clean_acc": 80.0, "eval_steps": 20, "avg_rob_err": avg_pgd, "worst_rob_err": worst_pgd,
               "aa_version": "standard" if std else "fast", "classwise_aa_acc_after": {"apgd-t": fast_classwise}}
        if std:
            out.update(aa_avg_rob_err=std[0], aa_worst_rob_err=std[1])
        return out

    base = tmp_path / "res" / "toy" / "clean"
    (base / "TRADES" / "seed0" / "ev.json").write_text(json.dumps(ev(40.0, 60.0, [70.0] * 9 + [30.0], (47.0, 72.0))))
    (base / "FRL" / "seed0" / "ev.json").write_text(json.dumps(ev(42.0, 55.0, [60.0] * 10)))
    (base / "AAA-meta" / "seed0" / "ev.json").write_text(json.dumps(ev(39.0, 58.0, [65.0] * 9 + [20.0])))
    (base / "TRADES" / "seed0" / "masking_report.json").write_text(json.dumps(
        {"test_images": 1000, "eps": 0.05, "accuracy": {"clean": 80.0, "Square (black-box)": 70.0},
         "eps_sweep": [{"eps": 1.0, "apgd_ce_acc": 0.0}], "flags": {"zero_gradients": {"fired": False}}}))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- grid:toy:attacks begin -->\n<!-- grid:toy:attacks end -->\n")
    report.main([str(tmp_path / "toy.json"), "--markdown", str(doc)])
    lines = doc.read_text().splitlines()
    # TRADES: fast avg = 100 - mean(9 x 70, 30) = 34.0, worst 70.0; gaps -6.0 / +10.0; standard 47 / 72
    assert "| clean | TRADES | 1 | 80.0 | 40.0 | 34.0 | -6.0 | 60.0 | 70.0 | +10.0 | 47.0 / 72.0 |" in lines
    assert "| clean | FRL | 1 | 80.0 | 42.0 | 40.0 | -2.0 | 55.0 | 40.0 | -15.0 |  |" in lines
    # best AAA minus best baseline: PGD avg 39 - 40 = -1.0, worst 58 - 55 = +3.0; AutoAttack avg
    # (100 - 60.5 = 39.5) - 34.0 = +5.5, worst 80 - 40 = +40.0
    assert "| clean | PGD-20 | -1.0 | +3.0 |" in lines
    assert "| clean | AutoAttack (APGD-CE + APGD-T) | +5.5 | +40.0 |" in lines
    assert any(line.startswith("- clean / TRADES (1000 images, eps 0.05): no sign of gradient masking") for line in lines)
