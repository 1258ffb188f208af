"""The attack engine against torchattacks, a plain PyTorch loop and its own contract."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aaa_fast
from aaa_fast import adversarial_pair, perturb
from aaa_fast.models import build_model


def small_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model("small-cnn", in_channels=1, num_classes=10).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()(torch.rand(64, 1, 28, 28, dtype=dtype))
    return model.eval()


def batch(n=12, seed=1, dtype=torch.float32, size=28, channels=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def per_sample_ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def plain_pgd(model, x, y, direction, eps, alpha, steps):
    """Independent oracle: the textbook loop, written with per-row tensors."""
    view = (-1, 1, 1, 1)
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + (direction * alpha).view(view) * grad.sign()
        x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps.view(view), eps.view(view)), 0, 1)
    return x_adv


@pytest.mark.parametrize("arch", ["small-cnn", "mlp"])
def test_equals_torchattacks_pgd(arch):
    torchattacks = pytest.importorskip("torchattacks")
    if arch == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    else:
        model = small_cnn()
    x, y = batch()
    ours = perturb(model, x, y, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False)(x, y)
    assert torch.equal(ours, theirs)
    assert (ours - x).abs().max() > 7 / 255  # it really moved


def test_equals_plain_loop_with_per_sample_direction_eps_alpha():
    model = small_cnn()
    x, y = batch(9)
    direction = torch.tensor([1, -1, 0] * 3)
    eps = torch.linspace(0.0, 0.1, 9)
    alpha = torch.linspace(0.005, 0.03, 9)
    ours = perturb(model, x, y, direction=direction, eps=eps, alpha=alpha, steps=6, random_start=False)
    assert torch.equal(ours, plain_pgd(model, x, y, direction.float(), eps, alpha, 6))


@pytest.mark.parametrize("random_start", [False, True, "normal"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_directions_move_the_loss_and_stay_bounded(random_start, norm):
    model = small_cnn()
    x, y = batch(12)
    direction = torch.tensor([1, -1, 0] * 4)
    eps = torch.linspace(0.02, 0.15, 12) * (1 if norm == "linf" else 20)
    out = perturb(model, x, y, direction=direction, eps=eps, steps=10, norm=norm, random_start=random_start,
                  generator=torch.Generator().manual_seed(0))
    before, after = per_sample_ce(model, x, y), per_sample_ce(model, out, y)
    assert (after[direction == 1] > before[direction == 1]).all()
    assert (after[direction == -1] < before[direction == -1]).all()
    delta = (out - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert out.min() >= 0 and out.max() <= 1
    if random_start is False:
        assert torch.equal(out[direction == 0], x[direction == 0])


def test_kl_loss_matches_explicit_loss_fn_and_ascends_kl():
    model = small_cnn()
    x, y = batch(8)
    with torch.no_grad():
        clean_log_p = F.log_softmax(model(x), dim=1)

    def kl_definition(logits, _y):  # KL(p(x) || p(x')) as METHOD.md writes it
        return (clean_log_p.exp() * (clean_log_p - F.log_softmax(logits, dim=1))).sum(1)

    def kl_div(logits, _y):  # the same quantity through torch's kl_div
        return F.kl_div(F.log_softmax(logits, dim=1), clean_log_p, reduction="none", log_target=True).sum(1)

    def attack(**kw):
        return perturb(model, x, y, eps=0.1, alpha=0.02, steps=5, random_start="normal",
                       generator=torch.Generator().manual_seed(3), **kw)

    ours = attack(loss="kl")
    assert torch.equal(ours, attack(loss_fn=kl_definition))
    # another summation order flips a few near-zero gradient signs at the start, nothing more
    assert (ours == attack(loss_fn=kl_div)).float().mean() > 0.9
    random_corner = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)  # same budget, no search
    with torch.no_grad():
        assert (kl_definition(model(ours), y) > 5 * kl_definition(model(random_corner), y)).all()


def test_adversarial_pair_equals_two_separate_attacks():
    model = small_cnn(dtype=torch.float64)
    x, y = batch(6, dtype=torch.float64)
    eps = torch.tensor([0.02, 0.04, 0.06, 0.08, 0.1, 0.12], dtype=torch.float64)
    x_adv, x_anti = adversarial_pair(model, x, y, eps=eps, steps=5, alpha=0.01,
                                     generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    common = dict(eps=eps, steps=5, alpha=0.01, random_start="normal", generator=gen)
    ref_adv = perturb(model, x, y, direction=1, loss="kl", **common)
    ref_anti = perturb(model, x, y, direction=-1, loss="ce", **common)
    assert torch.equal(x_adv, ref_adv) and torch.equal(x_anti, ref_anti)


def test_pair_of_chosen_rows_equals_separate_attacks_on_those_rows():
    """build_pair with adv_rows / anti_rows (the trainer's min_row_weight): the adversarial
    examples of the rows adv_rows and the anti-adversarial ones of anti_rows, one batch, equal to
    perturb on those rows (starts drawn for the adversarial rows first, one generator)."""
    from aaa_fast.attack import build_pair
    model = small_cnn(dtype=torch.float64).eval()
    x, y = batch(6, dtype=torch.float64)
    eps = torch.tensor([0.02, 0.04, 0.06, 0.08, 0.1, 0.12] * 2, dtype=torch.float32)
    alpha = torch.full((12,), 0.01, dtype=torch.float32)
    with torch.no_grad():
        clean = model(x)
    for adv_rows, anti_rows in ((torch.tensor([0, 2, 5]), torch.tensor([1, 2])), (None, torch.tensor([4])),
                                (None, torch.zeros(0, dtype=torch.long))):
        out = build_pair(model, x, y, clean, eps, alpha, steps=5, adv_rows=adv_rows, anti_rows=anti_rows,
                         generator=torch.Generator().manual_seed(7))
        a = torch.arange(6) if adv_rows is None else adv_rows
        gen = torch.Generator().manual_seed(7)
        common = dict(steps=5, alpha=0.01, random_start="normal", generator=gen)
        ref_adv = perturb(model, x[a], y[a], direction=1, loss="kl", eps=eps[:6][a], **common)
        ref_anti = perturb(model, x[anti_rows], y[anti_rows], direction=-1, loss="ce", eps=eps[6:][anti_rows],
                           **common) if anti_rows.numel() else x[:0]
        assert out.shape[0] == a.numel() + anti_rows.numel()
        assert torch.equal(out[:a.numel()], ref_adv) and torch.equal(out[a.numel():], ref_anti)


def test_adversarial_pair_per_row_bounds_for_both_halves():
    model = small_cnn()
    x, y = batch(4)
    eps = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.0, 0.05, 0.06, 0.07])  # adversarial rows first
    # KL has zero gradient at x itself: TRADES' "normal" start gets the adversarial rows going
    x_adv, x_anti = adversarial_pair(model, x, y, eps=eps, steps=4, alpha=0.02, random_start="normal",
                                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose((x_adv - x).flatten(1).abs().amax(1), eps[:4])
    assert torch.allclose((x_anti - x).flatten(1).abs().amax(1), eps[4:])
    assert per_sample_ce(model, x_anti, y).lt(per_sample_ce(model, x, y))[1:].all()


def test_row_result_does_not_depend_on_batch_mates():
    model = small_cnn(dtype=torch.float64)
    x, y = batch(10, dtype=torch.float64)
    direction = torch.tensor([1, -1] * 5)
    full = perturb(model, x, y, direction=direction, eps=0.1, steps=5, random_start=False)
    for rows in ([0], [3, 7], [9, 2, 5]):
        part = perturb(model, x[rows], y[rows], direction=direction[rows], eps=0.1, steps=5, random_start=False)
        assert torch.equal(part, full[rows])


@pytest.mark.parametrize("start_mode", ["train", "eval"])
def test_model_state_and_parameter_grads_untouched(start_mode):
    model = small_cnn().train(start_mode == "train")
    x, y = batch(8)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # one with a gradient, the rest None
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv, x_anti = adversarial_pair(model, x, y, eps=0.05, steps=3)
    perturb(model, x, y, eps=0.05, steps=3)
    assert model.training == (start_mode == "train")
    assert all(m.training == model.training for m in model.modules())
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # BN stats too
    assert not x_adv.requires_grad and not x_anti.requires_grad


def test_mode_restored_when_loss_fn_raises():
    model = small_cnn().train()
    x, y = batch(4)

    def broken(logits, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        perturb(model, x, y, loss_fn=broken, steps=2)
    assert model.training and all(m.training for m in model.modules())


def test_channels_last_and_dtype_preserved():
    torch.manual_seed(0)
    model = build_model("preact-resnet18").eval().to(memory_format=torch.channels_last)
    x, y = batch(4, size=32, channels=3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = perturb(model, x_cl, y, eps=8 / 255, steps=3, random_start=False)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == x.dtype
    ref = perturb(model, x, y, eps=8 / 255, steps=3, random_start=False)
    # convolution algorithms differ by layout, so a near-zero gradient may flip its sign
    assert (out == ref).float().mean() > 0.99


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast(amp_dtype):
    model = small_cnn()
    x, y = batch(8)
    out = perturb(model, x, y, eps=0.1, alpha=0.02, steps=5, random_start=False, amp_dtype=amp_dtype)
    assert out.dtype == torch.float32
    assert (out - x).abs().amax() <= 0.1 + 1e-6
    assert (per_sample_ce(model, out, y) > per_sample_ce(model, x, y)).all()
    # loss scaling keeps gradient signs alive: almost every pixel moved by a full step
    moved = ((out - x).abs() > 0.019).float().mean()
    assert moved > 0.9, moved


def test_compiled_model():
    model = small_cnn()
    x, y = batch(8)
    compiled = torch.compile(model)
    out = perturb(compiled, x, y, eps=0.1, steps=4, random_start=False)
    ref = perturb(model, x, y, eps=0.1, steps=4, random_start=False)
    assert (out == ref).float().mean() > 0.99


def test_steps_zero_returns_projected_start():
    model = small_cnn()
    x, y = batch(4)
    assert torch.equal(perturb(model, x, y, steps=0, random_start=False), x)
    start = perturb(model, x, y, eps=0.05, steps=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(start, aaa_fast.ops.random_init(x, 0.05, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kwargs,error,text", [
    (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "y has 3 rows but x has 4"),
    (dict(y=torch.tensor([0, 1, 2, 10])), ValueError, r"labels must lie in \[0, 9\]"),
    (dict(y=torch.tensor([0, -1, 2, 3])), ValueError, "labels must lie"),
    (dict(y=torch.zeros(4)), TypeError, "integer class labels"),
    (dict(eps=torch.ones(5)), ValueError, "eps must be a number"),
    (dict(eps=-0.1), ValueError, "eps must be finite and >= 0"),
    (dict(eps=torch.tensor([0.1, float("nan"), 0.1, 0.1])), ValueError, "eps must be finite"),
    (dict(direction=torch.tensor([1, 2, 0, 1])), ValueError, "direction"),
    (dict(steps=-1), ValueError, "steps must be an int >= 0"),
    (dict(steps=2.5), ValueError, "steps must be an int >= 0"),
    (dict(loss="hinge"), ValueError, "loss must be 'ce' or 'kl'"),
    (dict(loss_fn=lambda logits, y: logits.sum()), ValueError, "one loss per sample"),
    (dict(random_start="uniform"), ValueError, "random_start"),
    (dict(norm="l1"), ValueError, "norm must be"),
    (dict(amp_dtype=torch.float64), ValueError, "amp_dtype"),
    (dict(x=torch.zeros(4, 1, 28, 28, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
    (dict(model=small_cnn().to("meta")), ValueError, "model is on meta"),
])
def test_bad_input(kwargs, error, text):
    x, y = batch(4)
    args = dict(model=small_cnn(), x=x, y=y, steps=2)
    args.update(kwargs)
    with pytest.raises(error, match=text):
        perturb(args.pop("model"), args.pop("x"), args.pop("y"), **args)


def test_pair_bad_input():
    model = small_cnn()
    x, y = batch(4)
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(8,\)"):
        adversarial_pair(model, x, y, eps=torch.ones(6))
    with pytest.raises(ValueError, match="adv_loss"):
        adversarial_pair(model, x, y, adv_loss="mse")


# ---------------------------------------------------------------- CUDA graphs (run on a GPU only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "kl", "pair-kl", "pair-ce"])
def test_graph_replay_equals_the_eager_attack(kind, amp_dtype, monkeypatch):
    from aaa_fast.attack import AttackGraphs, loss_for, run_attack, run_pgd
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = small_cnn().cuda().to(memory_format=torch.channels_last)
    graphs = AttackGraphs(steps=4, norm="linf", amp_dtype=amp_dtype)
    rows = 2 if kind.startswith("pair") else 1

    def case(seed, n):
        x, y = (t.cuda() for t in batch(n, seed=seed))
        x = torch.cat([x] * rows).contiguous(memory_format=torch.channels_last)
        y = torch.cat([y] * rows)  # a pair's loss takes every row's label
        start = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
        direction = torch.ones(rows * n, device="cuda")
        direction[n:] = -1 if rows == 2 else 1
        eps = torch.linspace(0.02, 0.1, rows * n, device="cuda")
        alpha = eps / 3
        with torch.no_grad():
            clean = model(x[:n])
        args = (x, start, y, clean, direction, eps, alpha)
        eager = run_pgd(model, x, start.clone(), y, loss_for(kind, clean), direction, eps, alpha, 4, "linf", 0.0,
                        1.0, amp_dtype)
        graphed = run_attack(model, kind, *args, steps=4, norm="linf", lo=0.0, hi=1.0, amp_dtype=amp_dtype,
                             graphs=graphs)
        assert torch.equal(graphed, eager)
        assert (graphed - x).abs().amax() > 0  # it moved

    case(1, 12)
    case(2, 12)  # replayed with new inputs
    with torch.no_grad():  # an optimizer step between replays is seen
        for p in model.parameters():
            p.mul_(1.1)
    case(3, 12)
    case(4, 5)  # another shape: another graph
    assert len(graphs.entries) == 2 and graphs.enabled


@needs_cuda
@pytest.mark.parametrize("method", ["pgd-at", "trades", "aaa"])
def test_trainer_with_cuda_graphs_trains_like_the_eager_one(method, monkeypatch):
    from aaa_fast import AAAConfig, AAATrainer
    from aaa_fast.trainer import make_meta_net
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    x, y = (t.cuda() for t in batch(16))
    x_meta, y_meta = (t.cuda() for t in batch(8, seed=5))

    def trainer(graphs):
        model = small_cnn().cuda()
        config = AAAConfig(method=method, steps=3, eps=0.1, alpha=0.04, meta_every=2, cuda_graphs=graphs)
        meta = make_meta_net(config, seed=1) if method == "aaa" else None
        return AAATrainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True),
                          meta_net=meta, meta_optimizer=torch.optim.Adam(meta.parameters(), fused=True) if meta else None,
                          config=config)

    graphed, eager = trainer(True), trainer(False)
    assert graphed.attack_graphs is not None and eager.attack_graphs is None
    for _ in range(3):
        graphed.step(x, y, x_meta, y_meta)
        eager.step(x, y, x_meta, y_meta)
    assert graphed.attack_graphs.enabled and graphed.attack_graphs.entries
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
