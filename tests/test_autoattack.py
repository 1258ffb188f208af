"""aaa_fast.autoattack and aaa_fast.masking against independent oracles: torchattacks' APGD and
APGDT at the standard settings on a small model trained on real Fashion-MNIST (per-point equal
from the same random starts), a hand-built worst-case-per-point example, hand-counted class-wise
figures, and models masked on purpose for the gradient-masking report."""
import os

import pytest
import torch
from torch import nn

from aaa_fast.autoattack import (AutoAttackResult, apgd, autoattack, dlr_targeted_loss, run_attacks, target_classes,
                                 torchattacks_missing)
from aaa_fast.evaluation import ClasswiseResult, autoattack_summary
from aaa_fast.masking import masking_flags, masking_report, sweep_budgets

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST), reason="Debian's dataset-fashion-mnist "
                                  "(scripts/setup_env.sh installs it)")
needs_torchattacks = pytest.mark.skipif(torchattacks_missing() is not None, reason="torchattacks (the oracle)")
EPS = 0.1


def on_real_data(test):
    """Slow tests on the model trained on real Fashion-MNIST, with torchattacks as the oracle."""
    return pytest.mark.slow(needs_fmnist(needs_torchattacks(test)))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 49, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained():
    """A small CNN adversarially trained (PGD-3, eps 0.1) for 2 epochs on 6,000 real Fashion-MNIST
    images, and 500 test images: robust accuracy well between 0 and the clean accuracy."""
    from aaa_fast import perturb
    from aaa_fast.data import load_dataset

    data = load_dataset("fashion-mnist", None, download_missing=False)
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = data.train_x[:6000].float() / 255, data.train_y[:6000].long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        order = torch.randperm(6000)
        for i in range(0, 6000, 100):
            b = order[i:i + 100]
            xa = perturb(model, x[b], y[b], eps=EPS, steps=3, alpha=0.04)
            model.train()
            loss = nn.functional.cross_entropy(model(xa), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, data.test_x[:500].float() / 255, data.test_y[:500].long()


def torchattacks_robust(attack, model, x, y):
    return model(attack(x, y)).argmax(1) == y


def assert_misclassified(model, x_adv, y, tolerance=5e-3):
    """Every row of x_adv is misclassified: its best wrong logit above the true one. Up to
    `tolerance`: float32 convolutions differ with the batch's composition (the CPU library picks
    an algorithm per shape; a point broken inside the attack's batch re-evaluated alone at a
    margin of -1.3e-3 on an AVX2 CPU); a wrong adversarial is off by whole logits."""
    logits = model(x_adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    margin = logits.scatter(1, y[:, None], -torch.inf).amax(1) - true
    assert (margin > -tolerance).all(), f"margins of the broken points, lowest: {sorted(margin.tolist())[:5]}"


@on_real_data
def test_apgd_ce_and_apgd_t_match_torchattacks_per_point(trained):
    import torchattacks

    model, x, y = trained
    clean = (model(x).argmax(1) == y).float().mean().item()
    ours, x_adv = apgd(model, x, y, eps=EPS, loss="ce", generator=torch.Generator().manual_seed(0))
    theirs = torchattacks_robust(torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, seed=0,
                                                   loss="ce"), model, x, y)
    assert 0.2 < ours.float().mean().item() < clean - 0.1  # the attack has work to do, and does it
    assert torch.equal(ours, theirs)  # the same random starts (seed 0): the same points survive
    # every broken point is a checked certificate: misclassified, inside the ball and the box
    broken = ~ours & (model(x).argmax(1) == y)
    assert_misclassified(model, x_adv[broken], y[broken])
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1

    seq, _ = apgd(model, x, y, eps=EPS, loss="dlr-targeted", stack_targets=False,
                  generator=torch.Generator().manual_seed(0))
    ta = torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, seed=0, n_classes=10)
    assert ta.n_target_classes == 9
    theirs_t = torchattacks_robust(ta, model, x, y)
    assert torch.equal(seq, theirs_t)
    stacked, x_t = apgd(model, x, y, eps=EPS, loss="dlr-targeted", stack_targets=True, generator=torch.Generator().manual_seed(1))
    # the stacked targets draw other starts: the same attack, robust accuracy within 1 point
    assert abs(stacked.float().mean().item() - theirs_t.float().mean().item()) <= 0.01
    broken = ~stacked & (model(x).argmax(1) == y)
    assert_misclassified(model, x_t[broken], y[broken])
    assert (x_t - x).abs().max() <= EPS + 1e-6
    assert not (stacked & (model(x).argmax(1) != y)).any()  # a misclassified point is never robust


@on_real_data
def test_apgd_l2_matches_torchattacks(trained):
    import torchattacks

    model, x, y = trained
    x, y = x[:150], y[:150]
    ours, x_adv = apgd(model, x, y, eps=1.0, norm="l2", loss="ce", generator=torch.Generator().manual_seed(0))
    theirs = torchattacks_robust(torchattacks.APGD(model, norm="L2", eps=1.0, steps=100, n_restarts=1, seed=0,
                                                   loss="ce"), model, x, y)
    assert torch.equal(ours, theirs)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5


def test_dlr_targeted_loss_and_targets_by_hand():
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0]])
    # -(z_y - z_t) / (z_1st - (z_3rd + z_4th) / 2) with y = 0 and target class 1
    assert dlr_targeted_loss(logits, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(-2.0 / 4.5)
    assert target_classes(logits, 3).tolist() == [[1, 2, 3]]  # the 2nd, 3rd, 4th most likely classes


class FirstFeatures(nn.Module):
    """Logits = the first C features of the input; the last feature is the point's id (unused)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)[:, :self.c] + 0 * self.unused


def test_worst_case_per_point_hand_built():
    c, eps, n = 4, 0.1, 6
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = torch.full((n, 1, 1, c + 1), 0.2)
    x[torch.arange(n), 0, 0, y] = 0.5
    x[torch.arange(n), 0, 0, (y + 1) % c] = 0.45  # the runner-up class, 0.05 behind
    x[:, 0, 0, c] = torch.arange(n) / 10  # the id
    x[5, 0, 0, 0] = 0.9  # point 5 is misclassified already
    seen = {}

    def flip(xb, ids, by=0.05):
        out = xb.clone()
        for row in range(xb.shape[0]):
            if round(xb[row, 0, 0, c].item() * 10) in ids:
                top = xb[row, 0, 0, :c].argmax()
                out[row, 0, 0, top] -= by
                out[row, 0, 0, (top + 1) % c] += by
        return out

    def attack(name, ids, by=0.05):
        def run(xb, yb, _on_rows):
            seen[name] = sorted(seen.get(name, []) + [round(v * 10) for v in xb[:, 0, 0, c].tolist()])
            return flip(xb, ids, by)
        return run

    attacks = {"a": attack("a", {0, 1}), "b": attack("b", {2}, by=0.3),  # point 2: outside the ball, rejected
               "c": attack("c", {0, 2, 3})}
    res = run_attacks(FirstFeatures(c), x, y, attacks, eps=eps, norm="linf", batch_size=2, device=torch.device("cpu"))
    assert seen == {"a": [0, 1, 2, 3, 4], "b": [2, 3, 4], "c": [2, 3, 4]}  # each sees only the robust points
    assert res.clean_correct.tolist() == [True] * 5 + [False]
    assert res.robust.tolist() == [False, False, False, False, True, False]
    assert {k: v.sum().item() for k, v in res.robust_after.items()} == {"a": 3, "b": 3, "c": 1}
    assert res.rejected == 1 and res.accuracy == pytest.approx(100 / 6)
    assert torch.equal(res.x_adv[0], flip(x[:1], {0})[0]) and torch.equal(res.x_adv[4], x[4])


def test_class_count_comes_from_the_data_set():
    """A test subset without the last class keeps num_classes entries; averages and worst classes
    are over the classes present (hand-counted)."""
    y = torch.tensor([0, 0, 1, 1, 2])  # of 4 classes: class 3 absent
    res = AutoAttackResult(torch.tensor([True, True, True, False, True]), torch.tensor([True, False, False, False, True]),
                           torch.zeros(5, 1), "fast", ("apgd-ce", "apgd-t"), 0.1, "linf",
                           robust_after={"apgd-ce": torch.tensor([True, True, False, False, True]),
                                         "apgd-t": torch.tensor([True, False, False, False, True])},
                           seconds={"apgd-ce": 1.0, "apgd-t": 2.0})
    out = autoattack_summary(res, y, num_classes=4)
    assert out["classwise_aa_acc"] == [50.0, 0.0, 100.0, 0.0] and len(out["classwise_clean_acc"]) == 4
    assert out["aa_avg_rob_err"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)  # class 3 not averaged
    assert out["aa_worst_rob_err"] == 100.0 and out["aa_acc"] == pytest.approx(40.0)
    assert out["avg_nat_err"] == pytest.approx(100 * (0 + 0.5 + 0) / 3)
    assert out["aa_acc_after"] == {"apgd-ce": pytest.approx(60.0), "apgd-t": pytest.approx(40.0)}
    assert out["aa_seconds"] == 3.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="num_classes is 5 but the model has 4 outputs"):
        autoattack(model, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2]), eps=0.1, num_classes=5, version="fast")
    with pytest.raises(ValueError, match="version must be one of"):
        autoattack(model, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2]), eps=0.1, num_classes=4, version="plus")


def test_classwise_from_points_matches_classwise_accuracy():
    """ClasswiseResult.from_points (AutoAttack's) and classwise_accuracy (PGD's) agree on the same
    per-point outcomes: with steps=0 both count clean correctness."""
    from aaa_fast.evaluation import classwise_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x, y = torch.rand(40, 3, 2, 2), torch.randint(0, 5, (40,))
    ok = model(x).argmax(1) == y
    a = classwise_accuracy(model, x, y, 5, steps=0)
    b = ClasswiseResult.from_points(y, ok, ok, 5)
    assert torch.allclose(a.nat_acc, b.nat_acc) and torch.equal(a.counts, b.counts)
    assert a.summary() == b.summary()


@needs_torchattacks
def test_standard_version_runs_all_four_attacks_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)  # every point correct: each attack has points to work on
    calls = []
    res = autoattack(model, x, y, eps=0.05, num_classes=10, progress=lambda name, n: (calls.append(name), lambda done: None)[1])
    assert res.attacks == ("apgd-ce", "apgd-t", "fab-t", "square") and calls == list(res.attacks)
    assert list(res.robust_after) == list(res.attacks)
    counts = [int(res.clean_correct.sum())] + [int(v.sum()) for v in res.robust_after.values()]
    assert counts == sorted(counts, reverse=True) and counts[-1] == int(res.robust.sum())
    assert (res.x_adv - x).abs().max() <= 0.05 + 1e-5


def test_missing_torchattacks_refuses_standard_before_training(monkeypatch, tmp_path, data_dir):
    import importlib.util

    import aaa_fast.autoattack as aa_mod
    from aaa_fast import train

    real = importlib.util.find_spec
    monkeypatch.setattr(aa_mod.importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks"
                        else real(name, *a))
    assert "pip install --no-deps torchattacks" in torchattacks_missing()
    out = tmp_path / "run"
    args = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "small-cnn", "--epochs", "1",
            "--device", "cpu", "--out", str(out), "--final-attack", "both"]
    with pytest.raises(SystemExit, match="or pass --aa-version fast"):
        train.main(args)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ImportError, match="version='fast'"):
        autoattack(tiny_cnn(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), eps=0.1, num_classes=10)


def test_sweep_budgets_end_at_the_whole_box():
    assert sweep_budgets(0.1, "linf", 784) == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert sweep_budgets(0.5, "l2", 4)[-1] == 2.0


def test_masking_flags_by_hand():
    sweep = [{"eps": 0.1, "apgd_ce_acc": 40.0}, {"eps": 1.0, "apgd_ce_acc": 0.0}]
    healthy = {"PGD-20": 42.0, "PGD-100 x 5 restarts": 41.0, "APGD-CE": 40.5, "AutoAttack standard": 38.0,
               "Square (black-box)": 40.0}
    flags = masking_flags(healthy, sweep, 0.0, False, aa_name="AutoAttack standard", only_square=3)
    assert not any(f["fired"] for f in flags.values()), flags
    # stalled PGD (no gain from 100 steps x 5 restarts nor APGD) while AutoAttack finds 10 points more
    stalled = dict(healthy, **{"PGD-100 x 5 restarts": 42.0, "APGD-CE": 42.5, "AutoAttack standard": 32.0})
    assert masking_flags(stalled, sweep, 0.0, False, aa_name="AutoAttack standard",
                         only_square=3)["more_steps_do_not_help"]["fired"]
    blind = dict(healthy, **{"Square (black-box)": 30.0})  # black box 10.5 points below the best white box
    fired = masking_flags(blind, [{"eps": 1.0, "apgd_ce_acc": 9.0}], 12.5, True, aa_name="AutoAttack standard",
                          only_square=21)
    assert {k for k, f in fired.items() if f["fired"]} == {"black_box_beats_white_box", "not_zero_at_large_eps",
                                                         "zero_gradients", "randomized_forward"}
    assert "21 points broken by Square alone" in fired["black_box_beats_white_box"]["evidence"]
    unchecked = masking_flags({k: v for k, v in healthy.items() if "Square" not in k}, sweep, 0.0, False,
                              aa_name="AutoAttack standard", only_square=None, square_missing="no torchattacks")
    assert unchecked["black_box_beats_white_box"]["fired"] is None


class RoundedInput(nn.Module):
    """A model that rounds its input to 1/4 steps first: its input gradient is zero everywhere (a
    deliberately masked model, as a quantising defence would be)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


@on_real_data
def test_masking_report_flags_a_masked_model_and_not_a_normal_one(trained):
    model, x, y = trained
    x, y = x[:200], y[:200]
    normal = masking_report(model, x, y, eps=EPS, num_classes=10, aa_version="fast")
    assert not normal["masking_suspected"], normal["flags"]
    acc = normal["accuracy"]
    # each attack on its own random starts: a stronger one may leave a single point more
    point = 100 / y.shape[0] + 1e-4  # one image, in %, above float rounding
    assert acc["clean"] > acc["PGD-20"] >= acc["PGD-100 x 5 restarts"] - point
    assert acc["PGD-100 x 5 restarts"] >= acc["AutoAttack fast"] - point
    assert normal["eps_sweep"][-1]["apgd_ce_acc"] == 0.0 and normal["eps_sweep"][-1]["eps"] == 1.0

    masked = masking_report(RoundedInput(model).eval(), x, y, eps=EPS, num_classes=10, aa_version="fast")
    fired = {k for k, f in masked["flags"].items() if f["fired"]}
    assert {"black_box_beats_white_box", "zero_gradients", "not_zero_at_large_eps"} <= fired, masked["flags"]
    assert masked["masking_suspected"] and not masked["flags"]["randomized_forward"]["fired"]
