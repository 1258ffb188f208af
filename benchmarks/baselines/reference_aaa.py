"""A straightforward implementation of the reference AAA/CAAT iteration, the way research code
usually writes it: separate adversarial and anti-adversarial attacks that recompute the clean
forward at every step, a deep copy of the model for the virtual step (Meta-Weight-Net style
parameter surgery), and four separate forwards in the real step. Used only as a baseline."""
import copy

import torch
import torch.nn.functional as F

from aaa_fast.objective import sample_features

from .reference_attacks import reference_pair


def _swap_parameters(module, names_and_tensors):
    for name, tensor in names_and_tensors:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        del owner._parameters[leaf]
        setattr(owner, leaf, tensor)


def _weights(model, meta_net, x, y, class_loss_avg, class_share):
    model.eval()
    with torch.no_grad():
        features = sample_features(model(x), y, class_loss_avg, class_share)
    return meta_net(features)


def _loss(model, x, x_adv, x_anti, y, a, b, lam):
    nat = model(x)                                   # forward 1: clean, for CE
    target = F.softmax(model(x), dim=1)              # forward 2: clean again, for the KL target
    adv = model(x_adv)                               # forward 3
    anti = model(x_anti)                             # forward 4
    kl = (target * (torch.log(target + 1e-12) - F.log_softmax(adv, dim=1))).sum(1)
    return ((a * F.cross_entropy(nat, y, reduction="none")).mean() + lam * (a * kl).mean()
            + (b * F.cross_entropy(anti, y, reduction="none")).mean())


def reference_iteration(model, optimizer, meta_net, meta_optimizer, x, y, x_meta, y_meta, *, eps, alpha, steps,
                        lam, class_loss_avg, class_share, meta_step: bool):
    model.eval()
    x_adv, x_anti = reference_pair(model, x, y, eps, alpha, steps)
    if meta_step:
        a, b, _ = _weights(model, meta_net, x, y, class_loss_avg, class_share)
        shadow = copy.deepcopy(model).train()
        params = list(shadow.named_parameters())
        loss = _loss(shadow, x, x_adv, x_anti, y, a, b, lam)
        grads = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
        group = optimizer.param_groups[0]
        new = []
        for (name, p), g, real in zip(params, grads, model.parameters()):
            d = g + group["weight_decay"] * p
            buf = optimizer.state.get(real, {}).get("momentum_buffer")
            d = d if buf is None else group["momentum"] * buf + d
            new.append((name, p - group["lr"] * d))
        _swap_parameters(shadow, new)
        model.eval()
        xm_adv, xm_anti = reference_pair(model, x_meta, y_meta, eps, alpha, steps)
        ones = torch.ones(x_meta.shape[0], device=x_meta.device)
        meta_loss = _loss(shadow, x_meta, xm_adv, xm_anti, y_meta, ones, ones, lam)
        meta_optimizer.zero_grad()
        meta_loss.backward()
        meta_optimizer.step()
    with torch.no_grad():
        a, b, _ = _weights(model, meta_net, x, y, class_loss_avg, class_share)
    model.train()
    loss = _loss(model, x, x_adv, x_anti, y, a, b, lam)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
