"""AAATrainer: baselines against hand-written loops, AAA behaviour, BN isolation, exact resume."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import aaa_fast
from aaa_fast import AAAConfig, AAATrainer, MetaNet
from aaa_fast.methods import get_method, method_names
from aaa_fast.objective import sample_features
from aaa_fast.trainer import make_meta_net
from aaa_fast.models import build_model


def small_cnn(seed=0, classes=4):
    torch.manual_seed(seed)
    return build_model("small-cnn", in_channels=1, num_classes=classes)


def toy_problem(n=32, classes=4, seed=0):
    """Separable 14x14 images: class c lights up quadrant c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.2 * torch.rand(n, 1, 14, 14, generator=g)
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, :, 7 * r:7 * r + 7, 7 * q:7 * q + 7] += 0.7
    return x.clamp(0, 1), y


def make_trainer(method="aaa", seed=0, classes=4, meta_net=None, device="cpu", **cfg):
    model = small_cnn(seed, classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    config = AAAConfig(method=method, num_classes=classes, steps=cfg.pop("steps", 3), **cfg)
    if get_method(method).uses_meta_net and meta_net is None:
        meta_net = make_meta_net(config, seed=seed + 100)
    meta_opt = torch.optim.Adam(meta_net.parameters(), lr=1e-3, weight_decay=5e-4) if meta_net is not None else None
    return AAATrainer(model, opt, meta_net=meta_net, meta_optimizer=meta_opt, config=config)


def test_erm_step_equals_plain_sgd_step():
    x, y = toy_problem()
    trainer = make_trainer("erm")
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        trainer.step(x, y)
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    for p, q in zip(trainer.model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_pgd_at_step_equals_perturb_then_sgd():
    x, y = toy_problem()
    trainer = make_trainer("pgd-at", eps=0.1, alpha=0.03, seed=0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        trainer.step(x, y)
        x_adv = aaa_fast.perturb(model, x, y, eps=0.1, alpha=0.03, steps=3, generator=gen)
        opt.zero_grad()
        F.cross_entropy(model.train()(x_adv), y).backward()
        opt.step()
    for p, q in zip(trainer.model.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_the_toy_problem(method):
    x, y = toy_problem(48)
    x_meta, y_meta = toy_problem(8, seed=1)
    corrupted = torch.arange(48) % 5 == 0  # the oracle's corrupted rows (the labels are clean: it still learns)
    trainer = make_trainer(method, eps=0.05, alpha=0.02, meta_every=2)
    losses = [trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)["loss"] for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    with torch.no_grad():
        acc = (trainer.model.eval()(x).argmax(1) == y).float().mean()
    assert acc > 0.5


def test_meta_step_moves_the_meta_net_and_only_the_real_step_touches_batchnorm():
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    with_meta = make_trainer("aaa", meta_every=1, temperature=0.05)
    without = make_trainer("aaa", meta_every=1, temperature=0.05)
    meta_before = [p.clone() for p in with_meta.meta_net.parameters()]
    with_meta.step(x, y, x_meta, y_meta)
    without.step(x, y)  # no meta batch: no meta step
    assert any(not torch.equal(a, b) for a, b in zip(meta_before, with_meta.meta_net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(meta_before, without.meta_net.parameters()))
    # the meta step changed (a, b), so the weights differ, but BatchNorm statistics saw exactly one
    # real forward of the same rows in both trainers
    assert any(not torch.equal(p, q) for p, q in zip(with_meta.model.parameters(), without.model.parameters()))
    for (name, b1), (_, b2) in zip(with_meta.model.named_buffers(), without.model.named_buffers()):
        assert torch.equal(b1, b2), name
    assert int(dict(with_meta.model.named_buffers())["features.1.num_batches_tracked"]) == 1


def test_meta_bounds_mode_moves_the_bound_head():
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    trainer = make_trainer("aaa", bound_mode="meta", meta_every=1, temperature=0.05, eps=0.05)
    head_before = trainer.meta_net.net[-1].weight[2].clone()
    stats = [trainer.step(x, y, x_meta, y_meta) for _ in range(2)]
    assert not torch.equal(head_before, trainer.meta_net.net[-1].weight[2])
    assert all(0.5 * 0.05 <= s["mean_eps"] <= 2 * 0.05 for s in stats)


def test_state_dict_round_trip_gives_identical_next_steps():
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    trainer = make_trainer("aaa", meta_every=2, temperature=0.05)
    for _ in range(3):
        trainer.step(x, y, x_meta, y_meta)
    trainer.end_epoch(x_meta, y_meta)
    state = copy.deepcopy(trainer.state_dict())
    expected = [trainer.step(x, y, x_meta, y_meta) for _ in range(3)]

    resumed = make_trainer("aaa", seed=5, meta_every=2, temperature=0.05)  # different init, overwritten
    resumed.load_state_dict(state)
    got = [resumed.step(x, y, x_meta, y_meta) for _ in range(3)]
    assert got == expected
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_zero_meta_head_reduces_exactly_to_fixed_half_weights():
    """A meta-net whose output layer is zero gives a = b = 1/2 at any T: without meta steps the
    AAA trainer must follow aaa-fixed with weights (1/2, 1/2) exactly."""
    x, y = toy_problem(16)
    meta_net = MetaNet(temperature=1e-3)
    nn.init.zeros_(meta_net.net[-1].weight)
    nn.init.zeros_(meta_net.net[-1].bias)
    aaa = make_trainer("aaa", meta_net=meta_net, meta_every=10**9)
    fixed = make_trainer("aaa-fixed", fixed_weights=(0.5, 0.5))
    for _ in range(3):
        sa = aaa.step(x, y)
        sf = fixed.step(x, y)
        assert sa["loss"] == sf["loss"]
    for p, q in zip(aaa.model.parameters(), fixed.model.parameters()):
        assert torch.equal(p, q)


def test_large_temperature_approaches_fixed_half_weights():
    x, y = toy_problem(16)
    aaa = make_trainer("aaa", meta_init="reference", temperature=1e6, meta_every=10**9)
    fixed = make_trainer("aaa-fixed", fixed_weights=(0.5, 0.5))
    sa, sf = aaa.step(x, y), fixed.step(x, y)
    assert sa["loss"] == pytest.approx(sf["loss"], rel=1e-5)


def test_fairness_update_at_epoch_end_changes_class_weights_and_margins():
    x, y = toy_problem(16)
    trainer = make_trainer("frl", eps=0.05)
    trainer.step(x, y)
    trainer.end_epoch(classwise_nat_err=[0.0, 0.0, 0.5, 0.0], classwise_bdy_err=[0.6, 0.0, 0.0, 0.0])
    u, v = trainer.class_weights
    assert u.argmax() == 2 and v.argmax() == 0
    assert trainer.row_bounds(torch.tensor([0, 1]))[0] > trainer.row_bounds(torch.tensor([0, 1]))[1]
    # feature 2: this epoch's class losses replaced the initial 5.0
    assert (trainer.class_loss_avg < 5.0).all()


def test_nonfinite_loss_stops_or_is_skipped():
    x, y = toy_problem(8)
    x[0, 0, 0, 0] = float("nan")
    trainer = make_trainer("erm")
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises(FloatingPointError, match="iteration 0"):
        trainer.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    skipping = make_trainer("erm", skip_nonfinite=True)
    assert skipping.step(x, y)["skipped"] and skipping.skipped_steps == 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(amp):
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    trainer = make_trainer("aaa", amp=amp, channels_last=True, meta_every=1, temperature=0.05)
    stats = [trainer.step(x, y, x_meta, y_meta) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)
    assert next(trainer.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kwargs,text", [
    (dict(method="sgd"), "method must be one of"),
    (dict(bound_mode="wide"), "bound_mode must be one of"),
    (dict(method="trades", bound_mode="meta"), r"needs a method whose meta-network gives the bounds \(\['aaa'\]\)"),
    (dict(s_min=0.5, s_max=0.4), "0 < s_min <= s_max"),
    (dict(method="mart", fairness=True), "method='mart' has no class-weighted form"),
    (dict(eps=-1.0), "eps must be finite and >= 0"),
    (dict(meta_every=0), "meta_every must be an int >= 1"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(class_share=[0.5, 0.5]), "class_share needs 10 values"),
    (dict(method="trades", min_row_weight=0.1), r"min_row_weight .* needs a method that chooses them"),
    (dict(min_row_weight=1.0), r"min_row_weight must be in \[0, 1\)"),
    (dict(min_row_weight=-0.1), "min_row_weight must be finite and >= 0"),
])
def test_config_errors(kwargs, text):
    with pytest.raises(ValueError, match=text):
        AAAConfig(**kwargs)


def test_trainer_argument_errors():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs meta_net and meta_optimizer"):
        AAATrainer(model, opt, config=AAAConfig(method="aaa", num_classes=4))
    meta = MetaNet()
    with pytest.raises(ValueError, match="bound_head=True"):
        AAATrainer(model, opt, meta_net=meta, meta_optimizer=torch.optim.Adam(meta.parameters()),
                   config=AAAConfig(method="aaa", num_classes=4, bound_mode="meta"))
    with pytest.raises(TypeError, match="use torch.optim.SGD"):
        AAATrainer(model, torch.optim.Adam(model.parameters()), meta_net=meta,
                   meta_optimizer=torch.optim.Adam(meta.parameters()), config=AAAConfig(method="aaa", num_classes=4))
    trainer = make_trainer("erm")
    x, y = toy_problem(8)
    with pytest.raises(ValueError, match="x has 8 rows but y has 7"):
        trainer.step(x, y[:7])
    trades = make_trainer("frl")
    with pytest.raises(ValueError, match="pass the meta set"):
        trades.end_epoch()
    other = make_trainer("trades")
    with pytest.raises(ValueError, match="saved with method='frl'"):
        other.load_state_dict(trades.state_dict())
    # a meta-network of another width: refused before the model's weights are replaced
    saved = make_trainer("aaa", seed=1, meta_hidden=16).state_dict()
    narrow = make_trainer("aaa", seed=2, meta_hidden=8)
    weights = {k: v.clone() for k, v in narrow.model.state_dict().items()}
    with pytest.raises(ValueError, match="meta_net does not fit this trainer .*shapes saved vs here"):
        narrow.load_state_dict(saved)
    assert all(torch.equal(v, weights[k]) for k, v in narrow.model.state_dict().items())
    # an optimizer state of other parameter groups: refused before the model's weights are replaced
    saved = make_trainer("trades", seed=1).state_dict()
    saved["optimizer"]["param_groups"][0]["params"] = saved["optimizer"]["param_groups"][0]["params"][:-1]
    other = make_trainer("trades", seed=2)
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"optimizer has parameter groups of sizes \[\d+\], this trainer's"):
        other.load_state_dict(saved)
    assert all(torch.equal(v, weights[k]) for k, v in other.model.state_dict().items())


def test_compiled_model_with_meta_steps():
    """compile=True compiles the attack and real-step forwards; the lookahead stays eager."""
    x, y = toy_problem(8)
    x_meta, y_meta = toy_problem(4, seed=1)
    compiled = make_trainer("aaa", compile=True, meta_every=1, temperature=0.05, steps=1)
    eager = make_trainer("aaa", meta_every=1, temperature=0.05, steps=1)
    for _ in range(2):
        sc, se = compiled.step(x, y, x_meta, y_meta), eager.step(x, y, x_meta, y_meta)
        assert sc["meta_step"] and sc["loss"] == pytest.approx(se["loss"], rel=1e-2)  # compiled numerics
    assert set(compiled.state_dict()["model"]) == set(eager.state_dict()["model"])  # no _orig_mod. prefixes


def test_nonfinite_gradient_with_finite_loss_is_caught():
    x, y = toy_problem(8)
    trainer = make_trainer("erm")
    weight = trainer.model.head[-1].weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))  # a finite loss, a NaN gradient
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite training gradient at iteration 0"):
        trainer.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def noisy_toy(n=32, rate=0.4, seed=0):
    x, y = toy_problem(n)
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(n, generator=g) < rate
    noisy = y.clone()
    noisy[hit] = (y[hit] + 1 + torch.randint(0, 3, (int(hit.sum()),), generator=g)) % 4  # always another class
    return x, noisy, noisy != y


def test_first_meta_step_moves_the_trades_init():
    """From the default (trades) start the meta-gradient is non-zero on the very first meta step
    and that step changes every row's weights; from the reference start at T = 0.001 it is
    (numerically) zero for most seeds (docs/METHOD.md, "How the meta-network starts")."""
    x, y = toy_problem(32)
    x_meta, y_meta = toy_problem(16, seed=1)
    trainer = make_trainer("aaa", meta_every=1)
    features = sample_features(trainer.clean_logits(trainer.inputs(x, y)[0]), y, trainer.class_loss_avg,
                               trainer.class_share)
    with torch.no_grad():
        a_before, _, _ = trainer.meta_net.train()(features)
    stats = trainer.step(x, y, x_meta, y_meta)
    assert stats["meta_step"] and stats["meta_grad_norm"] > 1e-3
    a_after = trainer.last_choice[0]
    assert ((a_after - a_before).abs() > 1e-4).all()
    assert stats["grad_band"] == 1.0
    stuck = []
    for seed in range(6):
        reference = make_trainer("aaa", seed=seed, meta_every=1, meta_init="reference")
        stuck.append(reference.step(x, y, x_meta, y_meta)["meta_grad_norm"] < 1e-12)
    assert sum(stuck) >= 3, stuck


def test_collapse_guard_adds_the_gradient_of_the_excess_anti_share():
    """With the batch's mean b above anti_cap, the meta-gradient is the unguarded one plus the
    gradient of mean(b) - anti_cap, computed here directly on a copy of the meta-network."""
    x, y = toy_problem(32)
    x_meta, y_meta = toy_problem(16, seed=1)
    grads = {}
    for cap in (1.0, 0.5):
        torch.manual_seed(3)
        meta_net = MetaNet(start_a=0.1)  # every row starts on the anti side: mean b ~ 0.9
        trainer = make_trainer("aaa", meta_net=meta_net, meta_every=1, anti_cap=cap)
        if cap == 0.5:
            features = sample_features(trainer.clean_logits(trainer.inputs(x, y)[0]), y, trainer.class_loss_avg,
                                       trainer.class_share)
            twin = copy.deepcopy(meta_net).train()
            _, b, _ = twin(features)
            assert b.mean() > 0.5
            expected = torch.autograd.grad(b.mean(), list(twin.parameters()))
        trainer.step(x, y, x_meta, y_meta)
        grads[cap] = [p.grad.clone() for p in meta_net.parameters()]
    for off, on, guard in zip(grads[1.0], grads[0.5], expected):
        torch.testing.assert_close(on - off, guard, atol=1e-6, rtol=1e-4)


def test_collapse_guard_brings_an_all_anti_start_below_the_cap():
    """A tiny noisy run that starts with every row anti-adversarial does not stay there."""
    x, y, _ = noisy_toy()
    x_meta, y_meta = toy_problem(16, seed=1)
    torch.manual_seed(3)
    trainer = make_trainer("aaa", meta_net=MetaNet(start_a=0.05), meta_every=1, anti_cap=0.5)
    shares = [trainer.step(x, y, x_meta, y_meta)["frac_anti"] for _ in range(8)]
    assert shares[0] == 1.0 and shares[-1] <= 0.5, shares


def test_oracle_sends_corrupted_rows_to_the_anti_term():
    x, y, corrupted = noisy_toy()
    oracle = make_trainer("aaa-oracle", eps=0.05)
    stats = oracle.step(x, y, corrupted=corrupted)
    a, b = oracle.last_choice
    assert torch.equal(b, corrupted.float()) and torch.equal(a, 1 - corrupted.float())
    assert stats["frac_anti"] == pytest.approx(corrupted.float().mean().item()) and stats["grad_band"] == 0
    with pytest.raises(ValueError, match="needs corrupted="):
        oracle.step(x, y)
    with pytest.raises(ValueError, match="needs corrupted="):
        oracle.step(x, y, corrupted=corrupted[:5])


@pytest.mark.parametrize("objective", ["paper", "kl-all"])
def test_all_anti_rows_keep_the_kl_term_only_under_kl_all(objective):
    """Every row corrupted: a = 0, b = 1. The paper's objective then has no natural and no KL
    term; kl-all keeps the KL term (it needs no label) for every row."""
    x, y, _ = noisy_toy()
    oracle = make_trainer("aaa-oracle", eps=0.05, objective=objective)
    stats = oracle.step(x, y, corrupted=torch.ones_like(y, dtype=torch.bool))
    assert stats["natural"] == 0 and stats["anti"] > 0
    assert (stats["boundary"] > 0) == (objective == "kl-all")
    assert stats["loss"] == pytest.approx(stats["anti"] + oracle.config.lam * stats["boundary"], rel=1e-6)


def test_meta_net_start_depends_on_the_seed_it_is_given():
    config = AAAConfig(method="aaa", num_classes=4)
    same = [make_meta_net(config, seed=7).state_dict() for _ in range(2)]
    other = make_meta_net(config, seed=8).state_dict()
    state = torch.get_rng_state()
    make_meta_net(config, seed=9)
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert not torch.equal(same[0]["net.1.weight"], other["net.1.weight"])


# ---------------------------------------------------------------- host synchronisations
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "bincount", "unique", "_unique", "_unique2",
               "unique_consecutive", "unique_dim", "masked_select", "equal"}


class SyncCounter(TorchDispatchMode):
    """Counts the calls that make the host wait for the device's results: scalar reads (item,
    bool, float), value-dependent output shapes (nonzero, bincount, unique, masked_select), and
    Tensor.tolist/numpy (which bypass the dispatcher on the CPU, so they are patched)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls = []
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, _name=name, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in SYNCING_OPS:
            self.calls.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_trainer(method, device, **cfg):
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True)
    config = AAAConfig(**{**dict(method=method, num_classes=4, steps=2, meta_every=1, eps=0.1, alpha=0.05), **cfg})
    meta = make_meta_net(config, seed=1) if get_method(method).uses_meta_net else None
    meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-3, fused=True) if meta is not None else None
    return AAATrainer(model, opt, meta_net=meta, meta_optimizer=meta_opt, config=config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", method_names())
def test_a_training_step_makes_no_host_synchronisation(method, device, monkeypatch):
    x, y = (t.to(device) for t in toy_problem(16))
    x_meta, y_meta = (t.to(device) for t in toy_problem(8, seed=1))
    corrupted = (torch.arange(16) % 3 == 0).to(device)
    trainer = fused_trainer(method, device)
    trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)  # the first batches are checked on the host
    trainer.update_fairness(classwise_nat_err=[0.1, 0.2, 0.3, 0.4], classwise_bdy_err=[0.4, 0.3, 0.2, 0.1])
    counter = SyncCounter(monkeypatch)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with counter:
            for _ in range(2):  # method 'aaa': a meta step in each
                trainer.step(x, y, x_meta, y_meta, corrupted=corrupted)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert counter.calls == []
    assert trainer.read_stats()["steps"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_min_row_weight_reads_one_count_per_plain_step_and_none_on_full_steps(device, monkeypatch):
    """Skipping's documented cost: a plain step reads its kept count (one synchronisation), a
    step that attacks every row reads nothing."""
    x, y = (t.to(device) for t in toy_problem(16))
    corrupted = (torch.arange(16) % 3 == 0).to(device)
    trainer = fused_trainer("aaa-oracle", device, meta_every=2, min_row_weight=0.5)
    trainer.step(x, y, corrupted=corrupted)  # iteration 0: full, the first batch checked on the host
    calls = []
    for _ in range(2):  # iteration 1 plain, 2 full
        counter = SyncCounter(monkeypatch)
        with counter:
            trainer.step(x, y, corrupted=corrupted)
        calls.append(counter.calls)
    assert calls == [["_local_scalar_dense"], []]


def test_read_stats_are_the_means_of_the_steps():
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    trainer = fused_trainer("aaa", "cpu")
    trainer.config.meta_every = 2
    steps = [dict(trainer.step(x, y, x_meta, y_meta)) for _ in range(3)]
    read = trainer.read_stats()
    for key in trainer.stat_names:
        assert read[key] == pytest.approx(sum(s[key] for s in steps) / 3, rel=1e-6), key
    assert read["meta_steps"] == 2 and read["steps"] == 3 and read["skipped"] == 0
    assert read["meta_grad_norm"] == pytest.approx((steps[0]["meta_grad_norm"] + steps[2]["meta_grad_norm"]) / 2)
    assert trainer.read_stats()["steps"] == 0  # reading starts the sums afresh


def test_fused_optimizer_trains_like_the_plain_one():
    x, y = toy_problem()
    plain, fused = make_trainer("trades", eps=0.1, alpha=0.05, lam=1.5), fused_trainer("trades", "cpu", lam=1.5)
    plain.config.steps = fused.config.steps = 2
    for _ in range(3):
        plain.step(x, y)
        fused.step(x, y)
    for p, q in zip(plain.model.parameters(), fused.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_bad_later_batch_is_reported_by_read_stats():
    x, y = toy_problem(16)
    trainer = fused_trainer("trades", "cpu")
    trainer.step(x, y)
    trainer.step(x, torch.where(y == 3, 7, y))  # checked on the device: labels clamped, error deferred
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\].*got values in \[0, 7\]"):
        trainer.read_stats()
    trainer.step(x * 255, y)
    with pytest.raises(ValueError, match=r"x must hold images in \[0.0, 1.0\]"):
        trainer.read_stats()
    trainer.step(x, y)
    assert trainer.read_stats()["steps"] == 1  # the errors were cleared with their report


@pytest.mark.parametrize("skip", [False, True])
def test_a_nonfinite_step_is_skipped_on_the_device(skip):
    x, y = toy_problem(8)
    trainer = fused_trainer("erm", "cpu", skip_nonfinite=skip)
    trainer.step(x, y)
    before = [p.clone() for p in trainer.model.parameters()]
    momentum = [trainer.optimizer.state[p]["momentum_buffer"].clone() for p in trainer.model.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert trainer.step(bad, y)["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.equal(m, trainer.optimizer.state[p]["momentum_buffer"])
               for m, p in zip(momentum, trainer.model.parameters()))
    if skip:
        assert trainer.read_stats()["skipped"] == 1 and trainer.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="iteration 1"):
            trainer.read_stats()


def test_a_skipped_first_fused_step_leaves_no_uninitialised_momentum():
    x, y = toy_problem(8)
    trainer = fused_trainer("erm", "cpu", skip_nonfinite=True)
    reference = fused_trainer("erm", "cpu")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    trainer._checked_first["batch"] = reference._checked_first["batch"] = True
    trainer.step(bad, y)
    trainer.step(x, y)
    reference.step(x, y)
    for p, q in zip(trainer.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["trades", "aaa"])
def test_uint8_images_train_like_pixels_over_255(method):
    x, y = toy_problem(16)
    x_meta, y_meta = toy_problem(8, seed=1)
    pixels, meta_pixels = (t.mul(255).round().to(torch.uint8) for t in (x, x_meta))
    as_uint8, as_float = (make_trainer(method, meta_every=1, eps=0.1, alpha=0.05) for _ in range(2))
    for _ in range(2):
        as_uint8.step(pixels, y, meta_pixels, y_meta)
        as_float.step(pixels.float() / 255, y, meta_pixels.float() / 255, y_meta)
    for p, q in zip(as_uint8.model.parameters(), as_float.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_batches_of_another_image_shape_are_refused():
    """A 1-channel batch into a 3-channel model broadcasts through the normalisation, and a
    28x28 meta batch passes a 32x32 model's pooling: both are refused, naming the shapes."""
    from aaa_fast import perturb
    from aaa_fast.models import build_model

    model = build_model("small-cnn", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match=r"takes images of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        perturb(model, torch.rand(2, 1, 32, 32), torch.tensor([0, 1]), eps=0.1, steps=1)
    trainer = make_trainer("trades")
    x, y = toy_problem(8)
    trainer.step(x, y)
    with pytest.raises(ValueError, match=r"batch images have shape \(1, 28, 28\), but the trainer's first batch had "
                                         r"\(1, 14, 14\)"):
        trainer.step(torch.rand(8, 1, 28, 28), y)
    aaa = make_trainer("aaa")
    with pytest.raises(ValueError, match=r"meta batch images have shape \(3, 14, 14\)"):
        aaa.step(x, y, torch.rand(4, 3, 14, 14), y[:4])


# ---------------------------------------------------------------- min_row_weight: attack what has weight
def recorded_plans(trainer):
    plans = []
    prepare = trainer.method.prepare
    trainer.method.prepare = lambda batch: plans.append(prepare(batch)) or plans[-1]
    return plans


def test_min_row_weight_attacks_only_the_rows_whose_weight_counts():
    """aaa-oracle (b = 1 on the 7 corrupted rows, else 0) at tau 0.5: plain steps build anti
    examples for the corrupted rows only, their count rounded up to a multiple of 32 / 8 with other
    rows (8), every row keeps its adversarial example (kl-all); every meta_every-th step attacks
    every row and measures a dropped share of exactly 0 (the dropped rows' b is 0)."""
    x, y = toy_problem(32)
    corrupted = torch.arange(32) % 5 == 0
    trainer = make_trainer("aaa-oracle", min_row_weight=0.5, meta_every=3)
    plans = recorded_plans(trainer)
    stats = [trainer.step(x, y, corrupted=corrupted) for _ in range(4)]
    for i in (1, 2):
        plan = plans[i]
        assert plan.adv_rows is None and plan.anti_rows.shape == (8,)
        assert set(torch.nonzero(corrupted).flatten().tolist()) <= set(plan.anti_rows.tolist())
        assert [r.shape[0] for r in plan.rows] == [32, 32, 8]
        assert stats[i]["rows_attacked"] == pytest.approx(40 / 64) and "dropped_share" not in stats[i]
    for i in (0, 3):
        assert plans[i].anti_rows is None and stats[i]["rows_attacked"] == 1.0
        assert stats[i]["dropped_share"] == 0.0
    read = trainer.read_stats()
    assert read["measured_steps"] == 2 and read["dropped_share"] == 0.0
    assert read["rows_attacked"] == pytest.approx((1 + 40 / 64 + 40 / 64 + 1) / 4)


def test_min_row_weight_measures_what_skipping_drops():
    """AAA at its trades start (every b_i far below 0.5): plain steps attack no anti row
    (rows attacked 1/2); on the meta steps every anti term would be dropped, so the measured
    share equals the step's own anti term over its loss."""
    x, y = toy_problem(32)
    trainer = make_trainer("aaa", min_row_weight=0.5, meta_every=2)
    x_meta, y_meta = toy_problem(16, seed=1)
    stats = [trainer.step(x, y, x_meta, y_meta) for _ in range(3)]
    assert float(trainer.last_choice[1].max()) < 0.5
    assert stats[1]["rows_attacked"] == 0.5 and stats[1]["anti"] == 0.0
    for s in (stats[0], stats[2]):
        assert s["meta_grad_norm"] > 0 and s["anti"] > 0
        assert s["dropped_share"] == pytest.approx(s["anti"] / s["loss"], rel=1e-5)


@pytest.mark.parametrize("objective", ["paper", "kl-all"])
def test_min_row_weight_drops_adversarial_rows_under_the_paper_objective_only(objective):
    """aaa-fixed with (a, b) = (0.3, 0.7) at tau 0.5: under the paper objective a plain step
    builds no adversarial example (its KL term is 0) and the measuring step's dropped share is the
    lam-weighted KL term over the loss; under kl-all the KL term has weight 1 and stays."""
    x, y = toy_problem(32)
    trainer = make_trainer("aaa-fixed", fixed_weights=(0.3, 0.7), min_row_weight=0.5, meta_every=2,
                           objective=objective)
    plans = recorded_plans(trainer)
    full, plain = trainer.step(x, y), trainer.step(x, y)
    assert plans[1].anti_rows is None
    if objective == "paper":
        assert plans[1].adv_rows.numel() == 0 and plain["boundary"] == 0.0 and plain["rows_attacked"] == 0.5
        assert full["dropped_share"] == pytest.approx(trainer.config.lam * full["boundary"] / full["loss"], rel=1e-5)
    else:
        assert plans[1].adv_rows is None and plain["boundary"] > 0 and plain["rows_attacked"] == 1.0
        assert full["dropped_share"] == 0.0
