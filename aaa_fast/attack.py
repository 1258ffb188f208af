"""Per-sample signed PGD for a whole batch: one forward and one backward per step.

Every row i has its own direction d_i (+1 ascend the loss, -1 descend it, 0 keep) and bound
eps_i. The per-sample losses are summed (not averaged), so a row's gradient, and therefore its
step, does not depend on the batch it shares; the fused kernel (aaa_fast.ops) applies the
signed, bounded update to all rows at once.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model_io import autocast, check_in_box, check_label_dtype, check_labels, check_logits, eval_mode, predict
from .objective import per_sample_ce, upcast
from .ops import launch_pgd_step_, per_sample, prepare_step_args, uniform_start, unprojected_step

LossFn = Callable[[Tensor, Tensor], Tensor]
# fp16 autocast: gradients of a per-sample loss with respect to pixels can underflow in half
# precision and turn into zero signs; scaling the loss (a power of two: exact) prevents that.
FP16_LOSS_SCALE = 2.0**12


def kl_to_clean(clean_logits: Tensor) -> LossFn:
    """Per-sample KL(p(x) || p(x')) against the fixed clean prediction (TRADES); the clean
    log-probabilities are computed once per attack, not once per step."""
    log_p = F.log_softmax(upcast(clean_logits.detach()), dim=1)
    p = log_p.exp()
    p_log_p = (p * log_p).sum(dim=1)
    return lambda logits, _y: p_log_p - (p * F.log_softmax(upcast(logits), dim=1)).sum(dim=1)


cross_entropy: LossFn = per_sample_ce


def _check_inputs(model: nn.Module, x, y, steps, norm: str, random_start, amp_dtype) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, ...) with N samples, got shape {tuple(x.shape)}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    check_label_dtype(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"model is on {param.device} but x is on {x.device}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not (random_start is True or random_start is False or random_start == "normal"):
        raise ValueError(f"random_start must be True, False or 'normal', got {random_start!r}")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")


def starting_point(x: Tensor, eps: Tensor, random_start, norm: str, lo: float, hi: float,
                   generator: torch.Generator | None) -> Tensor:
    """The attack's first iterate; eps: validated float32 (N,)."""
    if random_start is True:
        return uniform_start(x, eps, norm, lo, hi, generator)
    if random_start == "normal":  # TRADES: x + 0.001 N(0, I)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return torch.empty_like(x).copy_(torch.clamp(x.float() + 0.001 * noise, lo, hi))
    return x.clone()


def run_pgd(model: nn.Module, x_nat: Tensor, x_start: Tensor, y: Tensor, loss_fn: LossFn,
            direction: Tensor, eps: Tensor, alpha: Tensor, steps: int, norm: str, lo: float, hi: float,
            amp_dtype: torch.dtype | None, validate_labels: bool = False,
            keep_unprojected: bool = False, autocast_cache: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """The PGD loop on validated float32 (N,) direction/eps/alpha; model already in eval mode.
    validate_labels: check y against the number of outputs on the first forward.
    keep_unprojected: also return v, the last iterate before its projection (float32), from
    which `ops.reference.project(v, x_nat, eps)` rebuilds the result differentiably in eps.

    Gradients are taken with respect to the input only (torch.autograd.grad), so parameters'
    .grad stay untouched and no weight gradient is computed.
    """
    scale = FP16_LOSS_SCALE if amp_dtype == torch.float16 else 1.0
    x_adv = x_start.detach()
    if steps == 0:  # project the start
        if validate_labels:
            check_labels(y, 2**62)  # no forward to learn the class count from: check the dtype
        out = launch_pgd_step_(x_adv.clone(), x_nat, torch.zeros_like(x_adv), direction, eps, alpha, norm, lo, hi)
        return (out, x_adv.float()) if keep_unprojected else out
    for step in range(steps):
        x_adv.requires_grad_(True)
        with autocast(x_nat.device, amp_dtype, autocast_cache):
            logits = model(x_adv)
        if validate_labels:
            check_labels(y, check_logits(logits, x_adv.shape[0]).shape[1])
            validate_labels = False
        loss = loss_fn(logits, y)
        if loss.shape != x_adv.shape[:1]:
            raise ValueError(f"loss_fn must return one loss per sample, shape ({x_adv.shape[0]},), "
                             f"got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum() * scale, x_adv)
        x_adv = x_adv.detach()
        if keep_unprojected and step == steps - 1:
            unprojected = unprojected_step(x_adv, grad, direction, alpha, norm)
        x_adv = launch_pgd_step_(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi)
    return (x_adv, unprojected) if keep_unprojected else x_adv


LOSS_KINDS = ("ce", "kl", "pair-kl", "pair-ce")


def loss_for(kind: str, clean_logits: Tensor | None) -> LossFn:
    """The per-sample attack loss `kind` names: "ce"; "kl" (TRADES: KL from `clean_logits`);
    "pair-kl" / "pair-ce": the AAA pair's rows, the first clean_logits.shape[0] (the adversarial
    rows, whose clean logits these are) ascending KL (or CE), the rest descending CE (their
    direction is -1); y holds every row's label."""
    if kind == "ce":
        return cross_entropy
    if kind == "kl":
        return kl_to_clean(clean_logits)
    adv_rows = kl_to_clean(clean_logits) if kind == "pair-kl" else cross_entropy
    n_adv = clean_logits.shape[0]

    def pair_loss(logits: Tensor, y: Tensor) -> Tensor:
        return torch.cat([adv_rows(logits[:n_adv], y[:n_adv]), cross_entropy(logits[n_adv:], y[n_adv:])])
    return pair_loss


class AttackGraphs:
    """The K-step attack loop captured as a CUDA graph, one per (model, loss, input shape), and
    replayed: the ~4K small kernels of an attack launched by one call, so a small model on a
    GPU is no longer bound by Python and kernel launches. The random start is drawn eagerly and
    copied in; the model's parameters and buffers are read where they live, so optimizer steps
    between replays are seen; autocast runs without its cast cache inside the capture. A
    capture that fails turns the graphs off with one warning, and attacks run eagerly."""

    def __init__(self, steps: int, norm: str, amp_dtype: torch.dtype | None, lo: float = 0.0, hi: float = 1.0):
        self.steps, self.norm, self.amp_dtype, self.lo, self.hi = steps, norm, amp_dtype, lo, hi
        self.entries: dict[tuple, tuple[list, torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None
        self.enabled = True

    def run(self, model: nn.Module, kind: str, x_nat: Tensor, start: Tensor, y: Tensor, clean_logits: Tensor | None,
            direction: Tensor, eps: Tensor, alpha: Tensor) -> Tensor | None:
        """The attack's result, or None when the graphs are off (the caller then runs eagerly)."""
        inputs = (x_nat, start, y, clean_logits, direction, eps, alpha)
        key = (id(model), kind, *((None,) if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in inputs))
        entry = self.entries.get(key)
        if entry is None and self.enabled:
            entry = self._capture(model, kind, inputs)
            if entry is not None:
                self.entries[key] = entry
        if entry is None:
            return None
        static, graph, out = entry
        with torch.no_grad():
            for buffer, value in zip(static, inputs):
                if buffer is not None:
                    buffer.copy_(value)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _capture(self, model, kind, inputs):
        static = [None if t is None else t.detach().clone() for t in inputs]

        def attack() -> Tensor:
            x_nat, start, y, clean_logits, direction, eps, alpha = static
            return run_pgd(model, x_nat, start, y, loss_for(kind, clean_logits), direction, eps, alpha, self.steps,
                           self.norm, self.lo, self.hi, self.amp_dtype, autocast_cache=False)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN choices, Triton compiles
                for _ in range(2):
                    attack()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = attack()
        except RuntimeError as exc:
            self.enabled = False
            warnings.warn(f"capturing the attack as a CUDA graph failed, attacks run eagerly from now on: {exc}")
            return None
        return static, graph, out


def run_attack(model: nn.Module, kind: str, x_nat: Tensor, start: Tensor, y: Tensor, clean_logits: Tensor | None,
               direction: Tensor, eps: Tensor, alpha: Tensor, *, steps: int, norm: str, lo: float, hi: float,
               amp_dtype: torch.dtype | None, graphs: AttackGraphs | None = None) -> Tensor:
    """run_pgd with the loss `kind` names, replayed from a CUDA graph when `graphs` is given
    (same arguments, same result) and eager otherwise."""
    if graphs is not None and steps > 0 and x_nat.is_cuda:
        out = graphs.run(model, kind, x_nat, start, y, clean_logits, direction, eps, alpha)
        if out is not None:
            return out
    return run_pgd(model, x_nat, start, y, loss_for(kind, clean_logits), direction, eps, alpha, steps, norm, lo, hi,
                   amp_dtype)


def perturb(model: nn.Module, x: Tensor, y: Tensor, *, direction=1, eps=8 / 255, steps: int = 10,
            alpha=None, norm: str = "linf", random_start=True, loss: str = "ce", loss_fn: LossFn | None = None,
            lo: float = 0.0, hi: float = 1.0, amp_dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """Per-sample signed PGD: adversarial (+1), anti-adversarial (-1) or untouched (0) rows.

    direction, eps, alpha: numbers or (N,) tensors; alpha defaults to 2.5*eps/steps per row.
    loss: "ce" (cross-entropy) or "kl" (KL from the clean prediction, computed once: TRADES);
    loss_fn(logits, y) -> (N,) per-sample losses overrides it. random_start: True (uniform in
    the ball), False, or "normal" (x + 0.001 N(0, I)). The model runs in eval mode and gets its
    mode back; parameters' gradients are untouched. Returns a detached tensor with x's dtype,
    device and memory format.
    """
    _check_inputs(model, x, y, steps, norm, random_start, amp_dtype)
    check_in_box(x, lo, hi)
    y = y.long()
    if loss_fn is None and loss not in ("ce", "kl"):
        raise ValueError(f"loss must be 'ce' or 'kl' (or pass loss_fn), got {loss!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(logits, y) -> per-sample losses, got {type(loss_fn).__name__}")
    n, device = x.shape[0], x.device
    eps_rows = per_sample("eps", eps, n, device, nonneg=True)[0]  # values checked just below
    if alpha is None:
        alpha = eps_rows * (2.5 / max(steps, 1))  # Madry et al.'s rule
    d, e, a = prepare_step_args(x, x, x, direction, eps_rows, alpha, norm, lo, hi)
    x = x.detach()
    with eval_mode(model):
        if loss_fn is None and loss == "kl":
            clean_logits = predict(model, x, amp_dtype)
            check_labels(y, clean_logits.shape[1])
            loss_fn = kl_to_clean(clean_logits)
        validate_labels = loss_fn is None  # cross-entropy: checked on the first forward
        start = starting_point(x, e, random_start, norm, lo, hi, generator)
        return run_pgd(model, x, start, y, loss_fn or cross_entropy, d, e, a, steps, norm, lo, hi, amp_dtype,
                       validate_labels)


def attack_rows(model: nn.Module, x: Tensor, y: Tensor, kind: str, clean_logits: Tensor | None,
                direction: Tensor, eps: Tensor, alpha: Tensor, *, steps: int, norm: str = "linf",
                random_start=True, lo: float = 0.0, hi: float = 1.0, amp_dtype: torch.dtype | None = None,
                generator: torch.Generator | None = None, graphs: AttackGraphs | None = None) -> Tensor:
    """perturb's engine for callers that checked everything already (the trainer checks each
    batch once): x detached in [lo, hi], labels in range, float32 (N,) direction/eps/alpha on x's
    device, model in eval mode; the loss named by `kind` (LOSS_KINDS). Checks nothing, so it adds
    no host synchronisation; with `graphs`, the loop is replayed from a CUDA graph."""
    start = starting_point(x, eps, random_start, norm, lo, hi, generator)
    return run_attack(model, kind, x, start, y, clean_logits, direction, eps, alpha, steps=steps, norm=norm, lo=lo,
                      hi=hi, amp_dtype=amp_dtype, graphs=graphs)


def adversarial_pair(model: nn.Module, x: Tensor, y: Tensor, *, eps=10 / 255, steps: int = 10, alpha=2 / 255,
                     adv_loss: str = "kl", norm: str = "linf", random_start="normal", lo: float = 0.0,
                     hi: float = 1.0, amp_dtype: torch.dtype | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The AAA pair (x_adv, x_anti) of METHOD.md, built as ONE batch of 2N rows.

    Rows 0..N-1 ascend adv_loss ("kl": KL from the clean prediction, TRADES; "ce":
    cross-entropy); rows N..2N-1 descend cross-entropy. One forward and one backward of the
    2N batch per step. eps and alpha: numbers, (N,) tensors shared by both halves, or (2N,)
    tensors (adversarial rows first). The starts are drawn for the adversarial half, then the
    anti-adversarial half, so the result equals two `perturb` calls sharing one generator.
    """
    _check_inputs(model, x, y, steps, norm, random_start, amp_dtype)
    check_in_box(x, lo, hi)
    y = y.long()
    if adv_loss not in ("kl", "ce"):
        raise ValueError(f"adv_loss must be 'kl' or 'ce', got {adv_loss!r}")
    n, device = x.shape[0], x.device

    def both_halves(name, value):
        if isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] not in (n, 2 * n):
            raise ValueError(f"{name} must be a number or have shape ({n},) or ({2 * n},), got {tuple(value.shape)}")
        if isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] == 2 * n:
            return value
        return per_sample(name, value, n, device, nonneg=True)[0].repeat(2)  # values checked below

    x = x.detach()
    x2 = torch.cat([x, x])  # prepare_step_args checks eps and alpha against 2N rows
    _, e, a = prepare_step_args(x2, x2, x2, 1, both_halves("eps", eps), both_halves("alpha", alpha), norm, lo, hi)
    with eval_mode(model):
        clean_logits = predict(model, x, amp_dtype)
        check_labels(y, clean_logits.shape[1])
        out = build_pair(model, x, y, clean_logits, e, a, steps=steps, adv_loss=adv_loss, norm=norm,
                         random_start=random_start, lo=lo, hi=hi, amp_dtype=amp_dtype, generator=generator)
    return out[:n], out[n:]


def build_pair(model: nn.Module, x: Tensor, y: Tensor, clean_logits: Tensor, eps: Tensor, alpha: Tensor, *,
               steps: int, adv_loss: str = "kl", norm: str = "linf", random_start="normal", lo: float = 0.0,
               hi: float = 1.0, amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
               keep_unprojected: bool = False, graphs: AttackGraphs | None = None,
               adv_rows: Tensor | None = None, anti_rows: Tensor | None = None):
    """adversarial_pair's engine for callers that already hold the clean logits (the trainer):
    validated float32 (2N,) eps/alpha (the adversarial half first), model already in eval mode.
    adv_rows / anti_rows: indices of the rows that get an adversarial / anti-adversarial example
    (None: every row; the trainer's min_row_weight attacks only rows whose weight counts).
    Returns the adversarial examples, then the anti-adversarial ones, and with keep_unprojected
    also their last unprojected iterate (eager then; otherwise replayed from `graphs` when given)."""
    n = x.shape[0]

    def pick(rows, t):
        return t if rows is None else t[rows]
    x_adv, x_anti = pick(adv_rows, x), pick(anti_rows, x)
    eps_adv, eps_anti = pick(adv_rows, eps[:n]), pick(anti_rows, eps[n:])
    x2 = torch.cat([x_adv, x_anti])
    y2 = torch.cat([pick(adv_rows, y), pick(anti_rows, y)])
    eps2 = eps if adv_rows is None and anti_rows is None else torch.cat([eps_adv, eps_anti])
    alpha2 = alpha if adv_rows is None and anti_rows is None else torch.cat([pick(adv_rows, alpha[:n]),
                                                                             pick(anti_rows, alpha[n:])])
    direction = torch.ones(x2.shape[0], device=x.device)
    direction[x_adv.shape[0]:] = -1
    start = torch.cat([starting_point(x_adv, eps_adv, random_start, norm, lo, hi, generator),
                       starting_point(x_anti, eps_anti, random_start, norm, lo, hi, generator)])
    kind = "pair-kl" if adv_loss == "kl" else "pair-ce"
    clean_adv = pick(adv_rows, clean_logits)
    if keep_unprojected:
        return run_pgd(model, x2, start, y2, loss_for(kind, clean_adv), direction, eps2, alpha2, steps, norm, lo, hi,
                       amp_dtype, keep_unprojected=True)
    return run_attack(model, kind, x2, start, y2, clean_adv, direction, eps2, alpha2, steps=steps, norm=norm, lo=lo,
                      hi=hi, amp_dtype=amp_dtype, graphs=graphs)
