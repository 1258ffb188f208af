"""Fault injection: bad flags, impossible settings, bad API inputs, colliding runs, moved data,
extended runs, unexpected errors. Each case must end in a clear message naming what was wrong
(exit status 2 for the CLIs' refusals), never a traceback, and lose nothing.
See docs/RELIABILITY.md for the table of faults."""
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

from aaa_fast import AAAConfig, AAATrainer, ops, perturb
from aaa_fast.data import DatasetError, datasets
from aaa_fast.models import build_model
from aaa_fast.runtime import RunDirLock, run_cli
from aaa_fast.run import epoch_steps, lr_factor, step_milestones
from aaa_fast.train import build_parser, main as train_main

from helpers import ENV, QUICK

# (flag arguments, the flag the message must name): refused by the parser, exit status 2
BAD_TRAIN_FLAGS = [
    (["--eps", "nan"], "--eps"), (["--eps", "-1"], "--eps"), (["--eps", "inf"], "--eps"),
    (["--eps", "1e39"], "--eps"), (["--eps", "abc"], "--eps"), (["--eps", "1/0"], "--eps"),
    (["--alpha", "0"], "--alpha"), (["--alpha", "-0.1"], "--alpha"), (["--steps", "-1"], "--steps"),
    (["--steps", "1.5"], "--steps"), (["--lam", "-1"], "--lam"), (["--lam", "nan"], "--lam"),
    (["--noise-rate", "1"], "--noise-rate"), (["--noise-rate", "-0.1"], "--noise-rate"),
    (["--imbalance-factor", "0.5"], "--imbalance-factor"), (["--num-meta", "-1"], "--num-meta"),
    (["--train-subset", "0"], "--train-subset"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr", "1e40"], "--lr"), (["--momentum", "1"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--meta-every", "0"], "--meta-every"), (["--meta-lr", "0"], "--meta-lr"),
    (["--meta-batch-size", "0"], "--meta-batch-size"), (["--temperature", "0"], "--temperature"),
    (["--anti-cap", "1.5"], "--anti-cap"), (["--eval-eps", "nan"], "--eval-eps"), (["--eval-eps", "-1"], "--eval-eps"),
    (["--eval-steps", "-5"], "--eval-steps"), (["--eval-every", "0"], "--eval-every"),
    (["--eval-subset", "0"], "--eval-subset"), (["--test-subset", "0"], "--test-subset"), (["--seed", "-1"], "--seed"),
    (["--dataset", "mnist"], "--dataset"), (["--arch", "resnet50"], "--arch"), (["--method", "foo"], "--method"),
    (["--label-noise", "bad"], "--label-noise"), (["--amp", "fp8"], "--amp"), (["--schedule", "linear"], "--schedule"),
    (["--objective", "x"], "--objective"), (["--meta-init", "x"], "--meta-init"), (["--bound-mode", "x"], "--bound-mode"),
    (["--device", "tpu"], "--device"), (["--progress", "x"], "--progress"), (["--epochs"], "--epochs"),
]
BAD_EVALUATE_FLAGS = [
    (["--checkpoint", "x.pt", "--eval-eps", "nan"], "--eval-eps"), (["--checkpoint", "x.pt", "--eval-eps", "-1"], "--eval-eps"),
    (["--checkpoint", "x.pt", "--eval-steps", "-5"], "--eval-steps"),
    (["--checkpoint", "x.pt", "--test-subset", "0"], "--test-subset"),
    (["--checkpoint", "x.pt", "--device", "tpu"], "--device"), ([], "--checkpoint"),
]


@pytest.mark.parametrize("argv,flag", BAD_TRAIN_FLAGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flag_is_refused_naming_it(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("argv,flag", BAD_EVALUATE_FLAGS, ids=[" ".join(a) for a, _ in BAD_EVALUATE_FLAGS])
def test_bad_evaluate_flag_is_refused_naming_it(argv, flag, capsys):
    from aaa_fast.evaluate import build_parser as evaluate_parser

    with pytest.raises(SystemExit) as stop:
        evaluate_parser().parse_args(argv)
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


def test_fractions_are_budgets_in_both_clis():
    from aaa_fast.evaluate import build_parser as evaluate_parser

    assert build_parser().parse_args(["--eps", "8/255"]).eps == 8 / 255
    assert evaluate_parser().parse_args(["--checkpoint", "x", "--eval-eps", "8/255"]).eval_eps == 8 / 255


def test_help_names_every_flag_with_help_and_its_fixed_default():
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    for action in parser._actions:
        if action.option_strings:
            assert action.help, f"{action.option_strings[0]} has no help"
    assert "(default: 128)" in text and "(default: runs/latest)" in text and "(default: 0.0)" in text


# settings that parse but cannot work with the data: refused before anything is written
IMPOSSIBLE = [
    (["--noise-rate", "0.2"], "--noise-rate needs --label-noise"),
    (["--method", "aaa-oracle"], "needs --label-noise"),
    (["--num-meta", "300", "--train-subset", "300"], "no training images are left"),
    (["--method", "aaa", "--num-meta", "0"], "--num-meta must be at least 10"),
    (["--method", "frl", "--num-meta", "0"], "--num-meta must be at least 10"),
    (["--num-meta", "55"], "--num-meta 55: num_meta must be a multiple"),
    (["--num-meta", "5000"], "--num-meta 5000"),
    (["--test-subset", "5"], "--test-subset must be at least the number of classes (10)"),
    (["--train-subset", "5"], "--num-meta 50 of --train-subset 5: class 0 has 0 samples"),
    (["--init", "missing.pt"], "--init missing.pt: checkpoint missing.pt does not exist"),
]


@pytest.mark.parametrize("argv,message", IMPOSSIBLE, ids=[" ".join(a) for a, _ in IMPOSSIBLE])
def test_impossible_settings_are_refused_and_leave_nothing(tmp_path, data_dir, argv, message, capsys):
    out = tmp_path / "run"
    base = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--num-meta", "50",
            "--device", "cpu", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        train_main([*base, *argv])
    assert message in str(stop.value.code)
    assert not out.exists()


def test_init_from_another_architecture_names_the_mismatch_and_creates_nothing(tmp_path, data_dir):
    from aaa_fast.checkpoint import save_atomic

    init, out = str(tmp_path / "resnet.pt"), tmp_path / "run"
    save_atomic({"trainer": {"model": build_model("resnet32", num_classes=10, in_channels=1).state_dict()}}, init)
    with pytest.raises(SystemExit) as stop:
        train_main(["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--num-meta", "50",
                    "--device", "cpu", "--init", init, "--out", str(out)])
    message = str(stop.value.code)
    assert f"--init {init}" in message and "does not fit" in message and "missing [" in message
    assert "(--arch small-cnn)" in message and not out.exists()


def test_evaluate_names_what_a_config_json_lacks(tmp_path):
    from aaa_fast.evaluate import main as evaluate_main

    (tmp_path / "config.json").write_text(json.dumps({"dataset": "fashion-mnist", "arch": "small-cnn"}))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu"])
    message = str(stop.value.code)
    assert "config.json: it has no config_hash, data_dir, method, seed, batch_size, eval_eps, eval_steps" in message


def test_evaluate_checks_its_outputs_and_the_checkpoint_before_any_work(tmp_path, data_dir):
    """--json into a missing directory, a --checkpoint that is a directory, a checkpoint of another
    architecture than config.json's, a --test-subset larger than the test set: refused, exit 2."""
    from aaa_fast.checkpoint import save_atomic
    from aaa_fast.evaluate import main as evaluate_main

    run = tmp_path / "run"
    train_main([*QUICK, "--epochs", "1", "--steps", "1", "--method", "erm", "--data-dir", data_dir, "--out", str(run)])
    ckpt = str(run / "checkpoint.pt")
    other = str(run / "resnet.pt")
    save_atomic({"config_hash": json.loads((run / "config.json").read_text())["config_hash"],
                 "trainer": {"model": build_model("resnet32", num_classes=10, in_channels=1).state_dict()}}, other)
    for argv, message in ((["--checkpoint", ckpt, "--json", str(tmp_path / "nodir" / "x.json")], "does not exist"),
                          (["--checkpoint", str(run)], "is a directory"),
                          (["--checkpoint", other], "does not fit"),
                          (["--checkpoint", ckpt, "--test-subset", "5000"], "is more than the 100 test images"),
                          (["--checkpoint", ckpt, "--data-dir", str(tmp_path / "moved")], "not found under")):
        with pytest.raises(SystemExit) as stop:
            evaluate_main([*argv, "--device", "cpu"])
        assert message in str(stop.value.code), argv
    shutil.copytree(data_dir, tmp_path / "moved")  # the data moved: --data-dir finds it
    evaluate_main(["--checkpoint", ckpt, "--device", "cpu", "--data-dir", str(tmp_path / "moved"),
                   "--json", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["clean_acc"] == json.loads(
        (run / "final.json").read_text())["clean_acc"]


def test_missing_data_is_one_sentence_and_creates_nothing(tmp_path, capsys):
    data, out = tmp_path / "nowhere", tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_main(["--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(out), "--device", "cpu"])
    assert "not found under" in str(stop.value.code)
    assert not data.exists() and not out.exists()


def test_offline_cifar_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*_args, **_kw):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        datasets.load_cifar(str(root), "cifar10", download_missing=True)
    message = str(err.value)
    assert "cannot download" in message and str(root / "cifar-10-python.tar.gz") in message
    assert "\n" not in message and not root.exists()


@pytest.mark.slow
def test_run_directory_is_owned_by_one_run(tmp_path, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from aaa_fast.runtime import RunDirLock; "
                               f"lock = RunDirLock({str(out)!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "aaa_fast.train", *QUICK, "--data-dir", data_dir, "--method",
                                 "erm", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2
        assert f"is in use by run pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
        assert sorted(os.listdir(out)) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    lock = RunDirLock(str(out))  # so nothing stale blocks the next run or a --resume
    lock.release()


@pytest.mark.slow
def test_resume_follows_the_data_not_its_path_and_extends_a_finished_run(tmp_path, data_dir):
    out = tmp_path / "run"
    args = [*QUICK, "--epochs", "1", "--method", "trades", "--out", str(out), "--test-subset", "20"]
    first = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--data-dir", data_dir],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    moved = tmp_path / "moved-data"
    shutil.copytree(data_dir, moved)
    changed = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--data-dir", str(moved) + "/",
                              "--lr", "0.01", "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert changed.returncode == 2 and "--lr (was 0.05, now 0.01)" in changed.stderr
    more = [a if a != "1" or args[i - 1] != "--epochs" else "2" for i, a in enumerate(args)]
    extended = subprocess.run([sys.executable, "-m", "aaa_fast.train", *more, "--data-dir", str(moved) + "/",
                               "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert "resuming" in extended.stderr and "the end of epoch 1 of 2" in extended.stderr
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # cosine over the new total: the lr after epoch 1 of 2 is lr * cos-factor(steps of 1 epoch)
    steps = epoch_steps(250, 64)
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * lr_factor("step", 2 * steps)(2 * steps))
    assert json.loads((out / "final.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_evaluate_reproduces_final_json_with_a_test_subset(tmp_path, data_dir):
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "aaa_fast.train", *QUICK, "--epochs", "1", "--method", "pgd-at",
                          "--data-dir", data_dir, "--out", str(out), "--test-subset", "30"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "aaa_fast.evaluate", "--checkpoint", str(out / "checkpoint.pt"),
                            "--device", "cpu", "--json", str(tmp_path / "again.json")],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "found in sys.modules" not in again.stderr
    final, redone = json.loads((out / "final.json").read_text()), json.loads((tmp_path / "again.json").read_text())
    for key in ("clean_acc", "pgd_acc", "classwise_clean_acc", "classwise_pgd_acc", "worst_rob_err"):
        assert redone[key] == final[key], key


@pytest.mark.slow
def test_progress_lines_inside_epochs_and_the_final_evaluation(tmp_path, data_dir):
    env = dict(ENV, AAA_FAST_PROGRESS_SECONDS="0")
    run = subprocess.run([sys.executable, "-m", "aaa_fast.train", *QUICK, "--epochs", "1", "--method", "erm",
                          "--data-dir", data_dir, "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "epoch 1/1: 1/4 (25%)" in run.stderr and "ETA" in run.stderr and "lr 0.05" in run.stderr
    assert "PGD-2 evaluation on 100 test images: started" in run.stderr
    assert "anti share" not in run.stdout and ", lr " in run.stdout  # erm has no anti share


def test_unexpected_errors_end_in_one_line_without_traceback(capsys, monkeypatch):
    def broken(_argv):
        raise RuntimeError("unexpected pos 832 vs 726\nmore detail")

    monkeypatch.delenv("AAA_FAST_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_cli(broken)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: unexpected pos 832 vs 726 (set AAA_FAST_DEBUG=1 for the traceback)"
    monkeypatch.setenv("AAA_FAST_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli(broken)

    def refuses(_argv):
        raise SystemExit("error: --flag must be something")

    with pytest.raises(SystemExit) as stop:
        run_cli(refuses)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: --flag must be something\n"


@pytest.mark.parametrize("n,batch,steps", [(256, 128, 2), (257, 128, 2), (258, 128, 3), (1, 128, 1), (129, 128, 1)])
def test_a_one_row_last_batch_joins_the_one_before(n, batch, steps):
    assert epoch_steps(n, batch) == steps


def test_step_schedule_for_very_short_runs():
    assert step_milestones(1) == [] and step_milestones(2) == [1] and step_milestones(100) == [50, 75]
    assert lr_factor("step", 1)(0) == 1.0  # a 1-step run trains at the full lr
    assert [lr_factor("step", 4)(t) for t in range(4)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]


def test_cosine_factor_matches_torch_cosine_annealing():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    factor = lr_factor("cosine", 10)
    for t in range(10):
        assert factor(t) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert factor(10) == pytest.approx(0.0) and math.isfinite(factor(12))


# --- the library API ---------------------------------------------------------------------------

def tiny_model():
    torch.manual_seed(0)
    return build_model("small-cnn", num_classes=10, in_channels=1)


@pytest.mark.parametrize("transform,shown", [(lambda x: x * 255, ", 255]"), (lambda x: x - 2, "[-2"),
                                            (lambda x: torch.where(x > 0.5, torch.nan, x), "nan")])
def test_perturb_refuses_images_outside_the_box(transform, shown):
    x, y = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"x must hold images in \[0.0, 1.0\]") as err:
        perturb(tiny_model(), transform(x), y, eps=0.1, steps=1)
    assert shown in str(err.value) and "Normalize" in str(err.value)


def test_adversarial_pair_and_trainer_refuse_images_outside_the_box():
    from aaa_fast import adversarial_pair

    model = tiny_model()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="pixel space"):
        adversarial_pair(model, x * 255, y, steps=1)
    trainer = AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         config=AAAConfig(method="trades", num_classes=10, eps=0.1, steps=1))
    with pytest.raises(ValueError, match="pixel space"):
        trainer.step(x * 255, y)
    trainer.step((x * 255).to(torch.uint8), y)  # uint8 images are scaled by the trainer itself


class DictOutput(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x)}


class FlatOutput(DictOutput):
    def forward(self, x):
        return self.model(x)[:, 0]


def perturb_ce(model, x, y):
    return perturb(model, x, y, eps=0.1, steps=1, loss="ce")


def pair(model, x, y):
    from aaa_fast import adversarial_pair

    return adversarial_pair(model, x, y, steps=1)


def trainer_step(model, x, y):
    trainer = AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         config=AAAConfig(method="trades", num_classes=10, eps=0.1, steps=1))
    return trainer.step(x, y)


# (API call, what goes wrong, the error and the words of its message)
BAD_API_INPUTS = [
    (trainer_step, "empty batch", ValueError, "batch is empty"),
    (trainer_step, "labels (N, 1)", ValueError, r"y must have shape \(N,\).*got shape \(4, 1\)"),
    (perturb_ce, "labels (N, 1)", ValueError, r"y must have shape \(N,\).*got shape \(4, 1\)"),
    (pair, "labels (N, 1)", ValueError, r"y must have shape \(N,\)"),
    (perturb_ce, "float labels", TypeError, "integer class labels"),
    (perturb_ce, "dict output", TypeError, r"must return a logits tensor of shape \(4, C\), got a dict .*wrapper"),
    (pair, "dict output", TypeError, "got a dict"),
    (trainer_step, "dict output", TypeError, "got a dict"),
    (perturb_ce, "1-D output", ValueError, r"logits of shape \(4, C\), got shape \(4,\)"),
    (trainer_step, "1-D output", ValueError, r"logits of shape \(4, 10\), got shape \(4,\)"),
]


def bad_input(case: str):
    model, x, y = tiny_model(), torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    if case == "empty batch":
        return model, x[:0], y[:0]
    if case == "labels (N, 1)":
        return model, x, y[:, None]
    if case == "float labels":
        return model, x, y.float()
    return (DictOutput if case == "dict output" else FlatOutput)(model), x, y


@pytest.mark.parametrize("call,case,error,message", BAD_API_INPUTS,
                         ids=[f"{c.__name__}-{case}" for c, case, _, _ in BAD_API_INPUTS])
def test_bad_api_inputs_are_refused_naming_what_came(call, case, error, message):
    with pytest.raises(error, match=message):
        call(*bad_input(case))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_labels_of_any_integer_dtype_give_the_int64_result(dtype):
    model, x, y = bad_input("none")[0].model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for call in (perturb_ce, pair):
        torch.manual_seed(0)
        want = call(model, x, y)
        torch.manual_seed(0)
        got = call(model, x, y.to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(want, got)) if isinstance(want, tuple) else torch.equal(want, got)
    a, b = tiny_model(), tiny_model()
    trainer_step(a, x, y)
    trainer_step(b, x, y.to(dtype))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def overlapping_views(shift: int):
    buffer = torch.rand(2 * 3 * 4 * 4 + shift)
    return buffer[shift:].view(2, 3, 4, 4), buffer[:buffer.numel() - shift].view(2, 3, 4, 4)


@pytest.mark.parametrize("backend", ops.available_backends())
@pytest.mark.parametrize("which", ["x_nat", "grad"])
def test_op_refuses_partially_overlapping_arguments(backend, which):
    ops.set_backend(backend)
    x_adv, other = overlapping_views(1)
    grad, x_nat = torch.randn(2, 3, 4, 4), x_adv.clone()
    args = dict(x_nat=other, grad=grad) if which == "x_nat" else dict(x_nat=x_nat, grad=other)
    with pytest.raises(ValueError, match=f"{which} overlaps x_adv's memory"):
        ops.pgd_step_(x_adv, args["x_nat"], args["grad"], 1, 0.1, 0.01)


@pytest.mark.parametrize("backend", ops.available_backends())
def test_op_accepts_x_nat_that_is_x_adv_and_disjoint_views(backend):
    ops.set_backend(backend)
    buffer = torch.rand(2, 2, 3, 4, 4)
    x_adv, x_nat, grad = buffer[0], buffer[1], torch.randn(2, 3, 4, 4)
    expected = ops.pgd_step_reference(x_adv, x_nat, grad, torch.ones(2), torch.full((2,), 0.1), torch.full((2,), 0.01))
    assert torch.equal(ops.pgd_step_(x_adv, x_nat, grad, 1, 0.1, 0.01), expected)
    same = torch.rand(2, 3, 4, 4)
    expected = ops.pgd_step_reference(same, same, grad, torch.ones(2), torch.full((2,), 0.1), torch.full((2,), 0.01))
    assert torch.equal(ops.pgd_step_(same, same, grad, 1, 0.1, 0.01), expected)


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_and_resume_redoes_it(tmp_path):
    import signal
    import time

    from helpers import fake_fashion_mnist

    data = fake_fashion_mnist(str(tmp_path / "data"), n_train=300, n_test=1200)
    out = tmp_path / "run"
    args = [*QUICK, "--epochs", "1", "--method", "erm", "--data-dir", data, "--out", str(out), "--eval-steps", "10"]
    proc = subprocess.Popen([sys.executable, "-m", "aaa_fast.train", *args], stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stderr:
        if "evaluation on 1200 test images: started" in line:
            sent = time.time()
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert time.time() - sent < 30  # within a batch, not after the whole evaluation
    assert "stopped during the final evaluation" in rest and not (out / "final.json").exists()
    done = subprocess.run([sys.executable, "-m", "aaa_fast.train", *args, "--resume"], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(finished: 1 epochs)" in done.stderr and (out / "final.json").exists()


@pytest.mark.parametrize("n,batch,world", [(130, 64, 2), (129, 64, 4), (67, 64, 4), (65, 64, 3), (10, 64, 4)])
def test_every_rank_gets_at_least_two_rows_and_every_row_is_trained(n, batch, world):
    from aaa_fast.run import batch_rows

    order = torch.randperm(n)
    steps = epoch_steps(n, batch)
    seen = []
    for i in range(steps):
        rows = batch_rows(order, i, steps, batch, world)
        shares = [rows[r::world] for r in range(world)]
        assert len({s.shape[0] for s in shares}) == 1 and shares[0].shape[0] >= 2
        seen.append(rows)
    assert set(torch.cat(seen).tolist()) == set(range(n))
    # a single process is never padded: exactly the epoch's rows, each once
    assert sorted(torch.cat([batch_rows(order, i, steps, batch, 1) for i in range(steps)]).tolist()) == list(range(n))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    from aaa_fast.checkpoint import CheckpointError, load_checkpoint, save_atomic

    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = str(disk / "checkpoint.pt")
        save_atomic({"w": torch.arange(1000.0)}, path)
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*MiB free.*the file it would replace is kept"):
            save_atomic({"w": torch.zeros(1_000_000)}, path)  # 4 MB into 2 MiB
        assert os.listdir(disk) == ["checkpoint.pt"]  # no temporary file left behind
        assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_second_signal_during_a_save_finishes_the_file_then_exits_130(tmp_path, monkeypatch):
    """torchrun and impatient users send a second SIGTERM/Ctrl-C; one arriving while a checkpoint
    is written must neither cut the file nor read as a disk failure."""
    import signal

    from aaa_fast.checkpoint import load_checkpoint, save_atomic
    from aaa_fast.runtime import StopRequested

    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"w": torch.zeros(3)}, path)
    real_save = torch.save

    def save_while_signalled(obj, f, *args, **kwargs):
        if not isinstance(f, io.BytesIO):  # the write into the file itself
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, f, *args, **kwargs)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        stopper = StopRequested()
        monkeypatch.setattr(torch, "save", save_while_signalled)

        def main(_argv):
            with stopper.saving():
                save_atomic({"w": torch.arange(3.0)}, path)
            raise AssertionError("the second signal must stop the run once the file is written")

        with pytest.raises(SystemExit) as stop:
            run_cli(main)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert stop.value.code == 130 and stopper.requested and stopper.again
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


ORPHAN_CHILD = """
import signal, sys, time
from aaa_fast.runtime import StopRequested
stopper = StopRequested()
print("ready", flush=True)
while not stopper.requested:
    time.sleep(0.01)
time.sleep(1.0)  # the rest of the step and the checkpoint, while more signals may come
print("stopped cleanly", flush=True)
"""

RUNNER_DIES = """
import sys, threading, time
from aaa_fast.study.runner import launch
def start():
    launch([sys.executable, "-c", sys.argv[1]], open(sys.argv[2], "a"))
    time.sleep(3600)
for _ in range(8):  # threads that outlive the launching one while the process dies
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
threading.Thread(target=start, daemon=True).start()
time.sleep(3600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_runner_killed_by_sigkill_stops_its_run_cleanly_once(tmp_path):
    """The kernel signals an orphan once per thread of the dying runner it is handed to; those
    repeated signals must read as one stop request (checkpoint, then exit), not as the second
    signal that stops at once without a checkpoint."""
    log = tmp_path / "child.log"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER_DIES, ORPHAN_CHILD, str(log)], env=ENV)
    deadline = time.time() + 60
    while "ready" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and runner.poll() is None, "the child never started"
        time.sleep(0.05)
    runner.kill()
    runner.wait()
    while "stopped cleanly" not in log.read_text():
        assert time.time() < deadline, f"the orphaned child did not stop cleanly:\n{log.read_text()}"
        time.sleep(0.05)
    assert "received signal 1" in log.read_text() and "Traceback" not in log.read_text()


def test_a_driver_waiting_for_another_tasks_run_stops_on_sigterm(tmp_path):
    """A study driver whose next run is owned by another driver (its .study.lock held) waits
    for it; a SIGTERM then ends the wait at once (exit 130, "interrupted"), instead of after the
    other driver's run, and the waiting driver starts nothing."""
    import fcntl

    out = tmp_path / "res"
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"out": str(out), "seeds": [0], "common": [], "scenarios": {"s": []},
                                "methods": {"A": ["--method", "erm"]}}))
    run_dir = out / "s" / "A" / "seed0"
    run_dir.mkdir(parents=True)
    owner = os.open(run_dir / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(owner, fcntl.LOCK_EX)  # the other driver's task
    driver = subprocess.Popen([sys.executable, "-m", "aaa_fast.study", "run", str(grid), "--executor", "local"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, deadline = "", time.time() + 60
        while "another study task owns" not in seen:
            assert time.time() < deadline and driver.poll() is None, f"the driver did not wait:\n{seen}"
            seen += driver.stdout.readline()
        driver.send_signal(signal.SIGTERM)
        rest, _ = driver.communicate(timeout=20)  # not the other run's hours
        assert driver.returncode == 130, seen + rest
        assert "interrupted" in rest and sorted(os.listdir(run_dir)) == [".study.lock"]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        os.close(owner)


@pytest.mark.slow
def test_finished_results_are_never_overwritten(tmp_path, data_dir):
    """A finished run whose checkpoints are gone (the grid runner deletes them) is refused with
    and without --resume; --resume --epochs fewer than trained is refused; --resume of a finished
    run does nothing. final.json is untouched every time (byte for byte and mtime)."""
    import glob

    out = tmp_path / "run"
    args = [sys.executable, "-m", "aaa_fast.train", *QUICK, "--epochs", "2", "--method", "erm", "--data-dir", data_dir,
            "--out", str(out), "--test-subset", "20"]
    assert subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600).returncode == 0
    final = out / "final.json"
    before = (final.read_bytes(), os.path.getmtime(final))

    def again(*extra):
        res = subprocess.run([*args, *extra], capture_output=True, text=True, env=ENV, timeout=600)
        assert (final.read_bytes(), os.path.getmtime(final)) == before, res.stderr[-2000:]
        return res

    res = again("--resume")
    assert res.returncode == 0 and "is finished (2 epochs, final.json written): nothing to do" in res.stderr
    res = again("--resume", "--epochs", "1")
    assert res.returncode == 2 and "has trained 2 epochs; --epochs 1 cannot shorten it" in res.stderr
    for path in glob.glob(str(out / "*.pt")):
        os.remove(path)
    res = again()
    assert res.returncode == 2 and "holds a finished run (final.json)" in res.stderr
    res = again("--resume")
    assert res.returncode == 2 and "without its checkpoints: it cannot be resumed" in res.stderr


@pytest.mark.slow
def test_an_extension_stopped_in_its_final_evaluation_is_evaluated_on_resume(tmp_path, data_dir):
    """--resume --epochs 2 over a finished 1-epoch run, stopped during its final evaluation, leaves
    the 1-epoch final.json beside the 2-epoch checkpoint: the next --resume must evaluate again."""
    out = tmp_path / "run"
    base = [*QUICK, "--method", "erm", "--data-dir", data_dir, "--out", str(out), "--test-subset", "20"]
    train_main([*base, "--epochs", "1"])
    one_epoch = (out / "final.json").read_text()
    train_main([*base, "--epochs", "2", "--resume"])
    assert json.loads((out / "final.json").read_text())["epochs"] == 2
    (out / "final.json").write_text(one_epoch)  # what the stop in the evaluation left
    train_main([*base, "--epochs", "2", "--resume"])
    assert json.loads((out / "final.json").read_text())["epochs"] == 2


def test_files_of_another_run_or_the_user_in_out_are_never_overwritten(tmp_path, data_dir):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.json", "metrics.csv", "curves.png"):
        (out / name).write_text("the user's own")
    base = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--num-meta", "50",
            "--device", "cpu", "--out", str(out)]
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as stop:
            train_main([*base, *extra])
        assert "holds config.json, metrics.csv, curves.png but no checkpoint of this run" in str(stop.value.code)
    assert all((out / n).read_text() == "the user's own" for n in ("config.json", "metrics.csv", "curves.png"))


def other_state_cases():
    cases = []
    saved = trainer_for("trades").state_dict()
    cases.append(({k: v for k, v in saved.items() if k != "fairness"}, ValueError, "has no fairness"))
    cases.append((dict(saved, class_loss_avg=torch.ones(3)), ValueError, r"class_loss_avg must have shape \(10,\)"))
    cases.append(([saved], TypeError, "must be a dict"))
    adam = trainer_for("trades", optimizer=torch.optim.Adam).state_dict()
    cases.append((adam, ValueError, "optimizer is of another optimizer"))
    return cases


def trainer_for(method, optimizer=torch.optim.SGD):
    model = tiny_model()
    return AAATrainer(model, optimizer(model.parameters(), lr=0.1),
                      config=AAAConfig(method=method, num_classes=10, eps=0.1, steps=1))


# AAAConfig settings that must be refused when the config is built, naming the field
BAD_CONFIGS = [
    (dict(tau=float("nan")), "tau must be finite and >= 0"), (dict(rho1=-1.0), "rho1"), (dict(rho2="0.2"), "rho2"),
    (dict(fixed_weights=(float("nan"), 0.5)), "fixed_weights"), (dict(fixed_weights=(0.5, float("inf"))), "fixed_weights"),
    (dict(class_share=[float("nan")] * 10), "class_share"), (dict(class_share=[-0.1] * 10), "class_share"),
    (dict(class_share=[0.0] * 10), "must not be all zero"), (dict(class_share="balanced"), "class_share needs 10 values"),
    (dict(norm="l1"), "norm must be 'linf' or 'l2'"), (dict(steps=True), "steps must be an int"),
    (dict(meta_every=True), "meta_every"), (dict(meta_hidden=True), "meta_hidden"),
    (dict(fairness_eval_steps=-3), "fairness_eval_steps"), (dict(fairness_eval_steps=2.5), "fairness_eval_steps"),
    (dict(eps=1e39), "eps must be finite and >= 0"), (dict(meta_lr=1e39), "meta_lr"), (dict(eps="0.03"), "eps"),
    (dict(channels_last="no"), "channels_last must be True or False"), (dict(compile="yes"), "compile"),
    (dict(skip_nonfinite="false"), "skip_nonfinite"), (dict(seed=1.5), "seed must be an int"),
    (dict(seed=2**70), "seed must be an int"), (dict(num_classes="10"), "num_classes must be an int"),
    (dict(num_classes=2.5), "num_classes"),
]


@pytest.mark.parametrize("fields,message", BAD_CONFIGS, ids=[str(f) for f, _ in BAD_CONFIGS])
def test_bad_config_values_are_refused_naming_the_field(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AAAConfig(method="frl", **fields)


def test_a_refused_state_leaves_the_trainer_as_it_was():
    for state, error, message in other_state_cases():
        trainer = trainer_for("trades")
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with pytest.raises(error, match=message):
            trainer.load_state_dict(state)
        assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_an_optimizer_of_another_model_and_non_bool_corrupted_are_refused():
    from aaa_fast.trainer import make_meta_net, make_meta_optimizer

    model, other = tiny_model(), tiny_model()
    with pytest.raises(ValueError, match=r"optimizer holds 16 parameters that are not model's \(of 16\)"):
        AAATrainer(model, torch.optim.SGD(other.parameters(), lr=0.1), config=AAAConfig(method="trades"))
    frozen = [p for name, p in model.named_parameters() if not name.startswith("features.0")]
    AAATrainer(model, torch.optim.SGD(frozen, lr=0.1), config=AAAConfig(method="trades"))  # freezing is fine
    cfg = AAAConfig(method="aaa", num_classes=10)
    meta, stranger = make_meta_net(cfg), make_meta_net(cfg)
    with pytest.raises(ValueError, match="meta_optimizer holds .* that are not meta_net's"):
        AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_net=meta,
                   meta_optimizer=make_meta_optimizer(cfg, stranger), config=cfg)
    oracle = trainer_for("aaa-oracle")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"a bool tensor of shape \(4,\).*got torch.int64\(4,\)"):
        oracle.step(x, y, corrupted=torch.tensor([1, 0, 1, 5]))


@pytest.mark.slow
def test_evaluate_refuses_data_other_than_the_runs(tmp_path):
    from helpers import fake_fashion_mnist

    data = fake_fashion_mnist(str(tmp_path / "data"), n_train=300, n_test=100)
    out = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "aaa_fast.train", *QUICK, "--epochs", "1", "--method", "erm",
                            "--data-dir", data, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    fake_fashion_mnist(data, n_train=300, n_test=100, seed=1)  # the same files, other content
    evaluate = [sys.executable, "-m", "aaa_fast.evaluate", "--checkpoint", str(out / "checkpoint.pt")]
    res = subprocess.run(evaluate, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "not the data the run was trained and tested on" in res.stderr
    res = subprocess.run([*evaluate, "--allow-other-data", "--json", str(tmp_path / "e.json")], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert res.returncode == 0 and json.loads((tmp_path / "e.json").read_text())["other_data"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cli", ["train", "evaluate"])
def test_device_cuda_without_cuda_is_refused_before_anything_is_read(cli, tmp_path):
    import importlib

    main = importlib.import_module(f"aaa_fast.{cli}").main
    argv = (["--device", "cuda", "--out", str(tmp_path / "run")] if cli == "train"
            else ["--device", "cuda", "--checkpoint", str(tmp_path / "missing" / "model.pt")])
    with pytest.raises(SystemExit, match="--device cuda but no CUDA device is available.*use --device cpu"):
        main(argv)
    assert os.listdir(tmp_path) == []
