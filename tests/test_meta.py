"""The lookahead meta-gradient against finite differences and a naive copy-the-model version."""
import copy

import pytest
import torch
from torch import nn

from aaa_fast import MetaNet, meta_gradient
from aaa_fast.meta import virtual_sgd_step
from aaa_fast.models import build_model
from aaa_fast.objective import sample_features, weighted_objective

@pytest.fixture(autouse=True)
def _float64():  # every test here runs in float64; the default comes back afterwards
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny_setup(model, meta_net, x_shape, n=6, n_meta=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *x_shape, generator=g)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    x_anti = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y = torch.randint(0, classes, (n,), generator=g)
    xm = torch.rand(n_meta, *x_shape, generator=g)
    ym = torch.arange(n_meta) % classes
    with torch.no_grad():
        features = sample_features(model(x), y, torch.full((classes,), 5.0), torch.full((classes,), 1 / classes))
    u = torch.tensor([0.5, 0.3, 0.2])[:classes]

    def train_loss(forward):
        a, b, _ = meta_net(features)
        nat, adv, anti = forward(torch.cat([x, x_adv, x_anti])).split(n)
        return weighted_objective(y, nat, a=a, u=u, adv_logits=adv, lam=1.5, anti_logits=anti, b=b).total

    def meta_loss(forward):
        return weighted_objective(ym, forward(xm), u=u).total

    return train_loss, meta_loss


def sgd_with_history(model, lr=0.1, momentum=0.9, wd=5e-3, nesterov=False, dampening=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov,
                          dampening=0.0 if nesterov else dampening)
    for p in model.parameters():  # one earlier step, so momentum buffers exist
        p.grad = torch.randn_like(p) * 0.1
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
    opt.step()
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    return opt


def manual_sgd(params, grads, opt):
    """SGD written out by hand from torch's documentation (independent of virtual_sgd_step)."""
    group = opt.param_groups[0]
    out = []
    for p, g in zip(params, grads):
        d = g + group["weight_decay"] * p
        buf = opt.state[p]["momentum_buffer"] * group["momentum"] + (1 - group["dampening"]) * d
        d = d + group["momentum"] * buf if group["nesterov"] else buf
        out.append(p - group["lr"] * d)
    return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_meta_gradient_matches_finite_differences(nesterov):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    meta_net = MetaNet(hidden=7, temperature=1.0)  # T = 1: smooth enough for differences
    opt = sgd_with_history(model, nesterov=nesterov)
    train_loss, meta_loss = tiny_setup(model, meta_net, (5,))
    buffers_before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = meta_gradient(model, meta_net, opt, train_loss, meta_loss)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers_before.items())  # BN untouched

    names = [n for n, _ in model.named_parameters()]

    def lookahead_value():
        params = dict(model.named_parameters())
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        fwd = lambda x: torch.func.functional_call(model, (params, buffers), (x,))  # noqa: E731
        g = torch.autograd.grad(train_loss(fwd), list(params.values()))
        new = dict(zip(names, manual_sgd(list(params.values()), g, opt)))
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return meta_loss(lambda x: torch.func.functional_call(model, (new, buffers), (x,))).item()

    h = 1e-6
    meta_params = list(meta_net.parameters())
    for p, g in zip(meta_params, grads):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
            up = lookahead_value()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            down = lookahead_value()
            with torch.no_grad():
                p.view(-1)[i] += h
            fd.view(-1)[i] = (up - down) / (2 * h)
        err = (g - fd).norm() / fd.norm().clamp_min(1e-12)
        assert err < 1e-4, (p.shape, err.item())
    assert sum(g.abs().sum() for g in grads) > 0


def test_meta_gradient_matches_naive_model_copy():
    torch.manual_seed(1)
    model = build_model("small-cnn", in_channels=1, num_classes=3)
    model.train()
    meta_net = MetaNet(temperature=0.5)
    opt = sgd_with_history(model)
    train_loss, meta_loss = tiny_setup(model, meta_net, (1, 28, 28), n=4, n_meta=3)
    ours = meta_gradient(model, meta_net, opt, train_loss, meta_loss)

    # naive: a deep copy whose parameters are swapped for the virtual weights, Meta-Weight-Net style
    clone = copy.deepcopy(model)
    params = list(clone.parameters())
    loss = train_loss(clone)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    orig = dict(model.named_parameters())
    new_weights = manual_sgd([orig[n] for n, _ in clone.named_parameters()], grads, opt)
    for (name, _), w in zip(list(clone.named_parameters()), new_weights):
        *path, leaf = name.split(".")
        module = clone
        for part in path:
            module = getattr(module, part)
        del module._parameters[leaf]
        setattr(module, leaf, w)
    naive = torch.autograd.grad(meta_loss(clone), list(meta_net.parameters()), allow_unused=True)
    for a, b in zip(ours, naive):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert sum(g.abs().sum() for g in ours) > 0


def test_virtual_step_equals_real_sgd_step():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.02, "weight_decay": 0.1}],
                          momentum=0.9, dampening=0.2, weight_decay=1e-3)
    for _ in range(3):  # real steps build momentum buffers
        opt.zero_grad()
        model(torch.randn(7, 4)).pow(2).mean().backward()
        params = dict(model.named_parameters())
        grads = {n: p.grad.clone() for n, p in params.items()}
        virtual = virtual_sgd_step({n: p.detach().clone() for n, p in params.items()}, grads, opt,
                                   {id(p): n for n, p in params.items()})
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(virtual[n], p.detach(), rtol=1e-12, atol=1e-14)


def test_virtual_step_rejects_other_optimizers():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        virtual_sgd_step(dict(model.named_parameters()), {}, torch.optim.Adam(model.parameters()), {})


def untrained_cnn_features(seed, n=64, classes=10):
    """The meta-network's inputs at the start of training: an untrained small CNN on random images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("small-cnn", num_classes=classes, in_channels=1)
    y = torch.arange(n) % classes
    with torch.no_grad():
        return sample_features(model(torch.rand(n, 1, 28, 28, generator=g)), y, torch.full((classes,), 5.0),
                               torch.full((classes,), 1 / classes))


def test_trades_init_starts_every_row_on_the_trades_side_inside_the_gradient_band():
    for seed in range(5):
        torch.manual_seed(100 + seed)
        a, b, _ = MetaNet().train()(untrained_cnn_features(seed))  # defaults: init "trades", T = 0.05
        assert (a > 0.7).all() and (a < 0.98).all(), (a.min(), a.max())
        assert (a * (1 - a) > 1e-2).all()  # far inside the band: every row gets a meta-gradient
        assert a.std() > 1e-3  # rows differ, so the meta step can tell them apart
        torch.testing.assert_close(a + b, torch.ones_like(a))


def test_reference_init_at_t_0001_is_a_saturated_coin_toss():
    """Documents the reference's start (docs/METHOD.md): at T = 0.001 the first anti share is a
    per-seed draw and few rows are inside the softmax's gradient band."""
    shares, in_band = [], []
    for seed in range(10):
        torch.manual_seed(100 + seed)
        a, b, _ = MetaNet(init="reference", temperature=1e-3).train()(untrained_cnn_features(seed))
        shares.append(float((b > a).double().mean()))
        in_band.append(float((a * (1 - a) > 1e-6).double().mean()))
    assert max(shares) - min(shares) > 0.5, shares
    assert max(in_band) < 0.3 and min(in_band) == 0.0, in_band


def test_metanet_rejects_bad_init_arguments():
    with pytest.raises(ValueError, match="init must be one of"):
        MetaNet(init="zeros")
    with pytest.raises(ValueError, match="start_a must be in"):
        MetaNet(start_a=1.0)


def test_one_row_batch_uses_running_statistics():
    """BatchNorm1d cannot normalise one row by its own statistics: the meta-network then uses its
    running ones (a last batch of one row must not stop an epoch)."""
    net = MetaNet().train()
    features = untrained_cnn_features(0, n=8)
    net(features)  # some running statistics
    a_one, _, _ = net(features[:1])
    assert net.training
    a_eval, _, _ = net.eval()(features[:1])
    torch.testing.assert_close(a_one, a_eval)
