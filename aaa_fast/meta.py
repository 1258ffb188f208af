"""The meta-network and the one-step-lookahead meta-gradient (METHOD.md, "Meta step").

The virtual step W_hat(Omega) = SGD step of W on L(W; Omega) is written with
torch.func.functional_call over parameter dicts and differentiated with autograd: no copy of the
model, no per-module surgery. Virtual forwards run on clones of the buffers, so the real model's
BatchNorm statistics are never changed by them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .objective import NUM_FEATURES

Params = dict[str, Tensor]


META_INITS = ("trades", "reference")
# the softmax temperature T that goes with each start: 0.05 keeps the trades start learnable
# (rows off the softmax's flat ends); 1e-3 is the authors' value (a near-hard split)
INIT_TEMPERATURE = {"trades": 0.05, "reference": 1e-3}
# the network's other defaults (AAAConfig's meta_* fields take theirs from here)
HIDDEN = 100      # the reference's hidden width
START_A = 0.9     # trades init: every row starts at a ~= 0.9
S_RANGE = (0.5, 2.0)  # meta bounds: s_i in [s_min, s_max], eps_i = s_i * eps_0


class MetaNet(nn.Module):
    """BatchNorm1d(6) -> Linear(6, hidden) -> ReLU -> Linear(hidden, 2 or 3).

    forward(features) -> (a, b, s): (a_i, b_i) = softmax(out[:, :2] / T), the weights of the
    TRADES and anti-adversarial terms; s_i in [s_min, s_max] from a third head when
    `bound_head` (the `meta` bounds of docs/METHOD.md), else None.

    init (docs/METHOD.md, "How the meta-network starts"):
    - "trades" (extension, the default): the last layer's weights are scaled by T and its bias
      set so that every row starts at a ~= `start_a` (TRADES side) with a(1 - a) far from 0, so
      the meta-gradient reaches every row from the first meta step.
    - "reference": PyTorch's default initialisation, as the authors' code. At T = 0.001 its
      first split is a near-hard coin toss and most rows sit where the softmax has no gradient.
    temperature: T, default the one that goes with `init` (INIT_TEMPERATURE: 0.05 trades, 1e-3 reference).
    """

    def __init__(self, in_features: int = NUM_FEATURES, hidden: int = HIDDEN, *, temperature: float | None = None,
                 bound_head: bool = False, s_min: float = S_RANGE[0], s_max: float = S_RANGE[1], init: str = "trades",
                 start_a: float = START_A):
        super().__init__()
        if init not in META_INITS:
            raise ValueError(f"init must be one of {META_INITS}, got {init!r}")
        if temperature is None:
            temperature = INIT_TEMPERATURE[init]
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= s_min <= s_max:
            raise ValueError(f"need 0 <= s_min <= s_max, got s_min={s_min}, s_max={s_max}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        if not 0 < start_a < 1:
            raise ValueError(f"start_a must be in (0, 1), got {start_a}")
        self.temperature, self.s_min, self.s_max = temperature, s_min, s_max
        self.net = nn.Sequential(nn.BatchNorm1d(in_features), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3 if bound_head else 2))
        if init == "trades":
            last = self.net[-1]
            with torch.no_grad():
                # out/T then has the default init's spread (rows differ, none saturates) around
                # logit(start_a) = out_a/T - out_b/T; the bound head starts as it would by default
                last.weight[:2].mul_(temperature)
                last.bias[:2] = torch.tensor([0.5, -0.5]) * temperature * math.log(start_a / (1 - start_a))

    @property
    def bound_head(self) -> bool:
        return self.net[-1].out_features == 3

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        features = features.to(self.net[1].weight.dtype)
        if features.shape[0] == 1 and self.training:
            # BatchNorm1d cannot take batch statistics of one row: use the running ones
            self.eval()
            try:
                out = self.net(features)
            finally:
                self.train()
        else:
            out = self.net(features)
        ab = torch.softmax(out[:, :2] / self.temperature, dim=1)
        s = None
        if self.bound_head:
            s = self.s_min + (self.s_max - self.s_min) * torch.sigmoid(out[:, 2])
        return ab[:, 0], ab[:, 1], s


def virtual_sgd_step(params: Params, grads: dict[str, Tensor | None], optimizer: torch.optim.SGD,
                     name_of: dict[int, str]) -> Params:
    """One step of `optimizer` (torch.optim.SGD semantics: lr, momentum buffer, dampening,
    weight decay, nesterov) applied out of place, so the result stays differentiable."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"the lookahead step replicates torch.optim.SGD, got {type(optimizer).__name__}")
    new = dict(params)
    for group in optimizer.param_groups:
        members = [(name_of[id(p)], p) for p in group["params"]
                   if id(p) in name_of and grads.get(name_of[id(p)]) is not None]
        if not members:
            continue
        if group.get("maximize", False):
            raise ValueError("the lookahead step does not support SGD(maximize=True)")
        names = [n for n, _ in members]
        ps = [params[n] for n in names]
        steps = [grads[n] for n in names]
        if group["weight_decay"] != 0:
            steps = torch._foreach_add(steps, ps, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for _, p in members]
            have = [i for i, b in enumerate(bufs) if b is not None]
            if have:  # buf <- momentum * buf + (1 - dampening) * step
                updated = torch._foreach_add(torch._foreach_mul([bufs[i] for i in have], group["momentum"]),
                                             [steps[i] for i in have], alpha=1 - group["dampening"])
                for i, b in zip(have, updated):
                    bufs[i] = b
            # a parameter without a buffer yet starts it at its step, like torch's SGD
            bufs = [steps[i] if b is None else b for i, b in enumerate(bufs)]
            steps = torch._foreach_add(steps, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        new.update(zip(names, torch._foreach_add(ps, steps, alpha=-group["lr"])))
    return new


def meta_gradient(model: nn.Module, meta_net: nn.Module, optimizer: torch.optim.SGD,
                  train_loss: Callable[[Callable[..., Tensor]], Tensor],
                  meta_loss: Callable[[Callable[..., Tensor]], Tensor]) -> list[Tensor]:
    """d L_meta(W_hat(Omega)) / d Omega for every parameter of `meta_net` (zeros where unused).

    train_loss(forward) computes L(W; Omega), calling `forward(x)` for the model's outputs at the
    current weights W and `meta_net` for the per-sample choices (its graph to Omega is kept).
    meta_loss(forward) computes the meta objective with `forward(x)` at the virtual weights
    W_hat = SGD step of W on L(W; Omega). Both forwards use clones of the model's buffers.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params: Params = dict(named)
    name_of = {id(p): n for n, p in named}

    def forward_with(weights: Params) -> Callable[..., Tensor]:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return lambda *args: functional_call(model, (weights, buffers), args, strict=False)

    loss = train_loss(forward_with(params))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    virtual = virtual_sgd_step(params, dict(zip(params, grads)), optimizer, name_of)
    outer = meta_loss(forward_with(virtual))
    meta_params = [p for p in meta_net.parameters() if p.requires_grad]
    meta_grads = torch.autograd.grad(outer, meta_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, meta_grads)]
