"""The method registry's contract, for every registered method (a new one gets these tests by
registering), and a method plugged in from outside the package."""
import ast
import copy
import math
import pathlib

import pytest
import torch
from torch import nn

from aaa_fast.methods import Method, Plan, StepLoss, base, get_method, method_names, register_method, step_stat_names
from aaa_fast.models import build_model

from test_trainer import make_trainer, toy_problem

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "aaa_fast"


def trainer_for(method, device="cpu", seed=0, **cfg):
    return make_trainer(method, seed=seed, device=device, **{"steps": 2, "meta_every": 2, "eps": 0.1, "alpha": 0.05, **cfg})


def batches(device="cpu"):
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    corrupted = torch.arange(16) % 4 == 0
    return [t.to(device) for t in (x, y, x_meta, y_meta, corrupted)]


@pytest.mark.parametrize("method", method_names())
def test_state_dict_round_trip_resumes_exactly(method):
    x, y, x_meta, y_meta, corrupted = batches()
    trainer = trainer_for(method)
    for _ in range(3):
        trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)
    trainer.end_epoch(x_meta, y_meta)
    state = copy.deepcopy(trainer.state_dict())
    expected = [dict(trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)) for _ in range(3)]
    resumed = trainer_for(method, seed=7)  # other initial weights: all overwritten by the state
    resumed.load_state_dict(state)
    got = [dict(resumed.step(x, y, x_meta, y_meta, corrupted=corrupted)) for _ in range(3)]
    assert got == expected
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", method_names())
def test_step_statistics_follow_the_methods_terms(method):
    x, y, x_meta, y_meta, corrupted = batches()
    trainer = trainer_for(method)
    stats = trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)
    names = step_stat_names(method)
    assert names == ("loss", *get_method(method).terms, "frac_anti", "grad_band", "mean_eps", "rows_attacked")
    assert set(names) <= set(stats)
    # the total is the method's own: the terms are finite parts of it
    assert all(math.isfinite(stats[k]) for k in names)
    assert set(names) <= set(trainer.read_stats())


@pytest.mark.parametrize("method", method_names())
def test_bad_input_messages(method):
    x, y, x_meta, y_meta, corrupted = batches()
    cases = [(lambda: (x * 255, y), r"x must hold images in \[0.0, 1.0\]"),
             (lambda: (x, y + 4), r"labels must lie in \[0, 3\]")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):  # a first batch: checked on the host
            trainer_for(method).step(*bad(), x_meta, y_meta, corrupted=corrupted)
        trainer = trainer_for(method)
        trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)
        trainer.step(*bad(), x_meta, y_meta, corrupted=corrupted)  # later ones: on the device, raised when read
        with pytest.raises(ValueError, match=message):
            trainer.read_stats()
    with pytest.raises(ValueError, match="x has 16 rows but y has 15"):
        trainer_for(method).step(x, y[:15], x_meta, y_meta, corrupted=corrupted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", method_names())
def test_cuda_graph_replay_equals_eager(method):
    x, y, x_meta, y_meta, corrupted = batches("cuda")
    graphed, eager = trainer_for(method, "cuda"), trainer_for(method, "cuda", cuda_graphs=False)
    for _ in range(3):
        a = graphed.step(x, y, x_meta, y_meta, corrupted=corrupted)
        b = eager.step(x, y, x_meta, y_meta, corrupted=corrupted)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_registry_refuses_bad_methods():
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("madry")
    with pytest.raises(ValueError, match="already registered"):
        @register_method
        class Other(Method):
            name = "trades"
    with pytest.raises(ValueError, match="no shared setting"):
        @register_method
        class Odd(Method):
            name = "odd"
            defaults = dict(warmup=5)
    with pytest.raises(ValueError, match="not a usable term name"):
        @register_method
        class Clash(Method):
            name = "clash"
            terms = ("loss",)
    assert "odd" not in method_names() and "clash" not in method_names()


@pytest.fixture
def plugged():
    """A method defined outside the package: CE on the clean rows plus a CE on x flipped left-right,
    counting its optimizer steps and epochs as state."""
    @register_method
    class FlipCE(Method):
        name = "flip-ce"
        description = "test plug-in: CE on clean and mirrored images"
        terms = ("clean", "mirrored")
        defaults = dict(lam=0.5)

        def __init__(self, trainer):
            super().__init__(trainer)
            self.updates, self.epochs = 0, 0

        def prepare(self, batch):
            return Plan([batch.x, batch.x.flip(-1)])

        def loss(self, batch, logits, plan):
            clean = nn.functional.cross_entropy(logits[0], batch.y, reduction="none")
            mirrored = nn.functional.cross_entropy(logits[1], batch.y)
            return StepLoss(clean.mean() + self.trainer.config.lam * mirrored,
                            {"clean": clean.mean(), "mirrored": mirrored}, clean.detach())

        def after_optimizer_step(self, batch, plan):
            self.updates += 1

        def end_epoch(self):
            self.epochs += 1

        def state_dict(self):
            return {"updates": self.updates, "epochs": self.epochs}

        def load_state_dict(self, state):
            self.updates, self.epochs = state["updates"], state["epochs"]

    yield FlipCE
    del base._REGISTRY["flip-ce"]


def test_a_method_plugged_in_from_outside_trains_and_keeps_its_state(plugged):
    x, y = toy_problem(16)
    trainer = trainer_for("flip-ce")
    assert trainer.config.lam == 0.5 and trainer.config.bound_mode == "fixed"  # its default, the shared one
    stats = trainer.step(x, y)
    # the engine back-propagated the method's total: the same as a hand-made loop's
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    logits = model.train()(torch.cat([x, x.flip(-1)]))
    loss = nn.functional.cross_entropy(logits[:16], y) + 0.5 * nn.functional.cross_entropy(logits[16:], y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["clean"] + 0.5 * stats["mirrored"] == pytest.approx(stats["loss"], rel=1e-6)
    for p, q in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    trainer.step(x, y)
    trainer.end_epoch()
    state = trainer.state_dict()
    assert state["method_state"] == {"updates": 2, "epochs": 1}
    resumed = trainer_for("flip-ce", seed=3)
    resumed.load_state_dict(copy.deepcopy(state))
    assert (resumed.method.updates, resumed.method.epochs) == (2, 1)
    # a method that keeps no state refuses a state that has some
    with pytest.raises(ValueError, match="keeps no state"):
        trainer_for("trades").load_state_dict(dict(copy.deepcopy(state), config=dict(state["config"], method="trades")))


def _compares_a_method_name(node: ast.Compare, names: set[str], source: str) -> bool:
    sides = [node.left, *node.comparators]
    literal = any(isinstance(s, ast.Constant) and s.value in names for s in sides) or any(
        isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Constant) and e.value in names
                                                             for e in s.elts) for s in sides)
    return literal and "method" in ast.get_source_segment(source, node)


def test_no_code_outside_methods_compares_a_method_name():
    names = set(method_names())
    for sample, hit in [('args.method == "aaa"', True), ('cfg.method in ("frl", "aaa")', True),
                        ('meta_init == "trades"', False)]:  # the check itself can fail
        assert _compares_a_method_name(ast.parse(sample).body[0].value, names, sample) is hit
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Compare) and _compares_a_method_name(node, names, source):
                found.append(f"{path.name}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert found == []
