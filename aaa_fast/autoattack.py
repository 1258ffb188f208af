"""AutoAttack (Croce & Hein, ICML 2020) as the field runs it, in fp32, with the class count from
the data set.

`autoattack(model, x, y, eps=..., num_classes=...)` runs the standard version's attacks in order,
each only on the points every earlier attack left robust, and counts a point as robust only if it
survives all of them (the worst case per point):

- APGD-CE: 100 iterations, 1 restart, rho = 0.75, step size 2 eps halved at the checkpoints;
- APGD-T: the targeted DLR loss on the 9 most likely wrong classes, 100 iterations, 1 restart each;
- FAB-T: 9 target classes, 100 iterations, 1 restart;
- Square: 5,000 queries, p_init = 0.8 (black-box, no gradients).

APGD-CE and APGD-T are this project's own, on the attack engine's per-sample projection
(`aaa_fast.ops`); APGD-T runs its 9 targets as one stacked batch (one forward/backward for all
targets of a point) instead of 9 sequential attacks. FAB-T and Square are torchattacks' `FAB` and
`Square` classes configured to the standard parameters (torchattacks is needed for them only).
The "fast" version (APGD-CE + APGD-T) is a named subset, not the standard: for quick looks, never
for a reported figure.

Model contract, as in the field: inputs in [0, 1], logits out, no normalisation outside the
model; it runs in eval mode (its mode restored afterwards). A point counts as broken only when the
attack's returned input is misclassified and lies inside the eps-ball and the [0, 1] box: every
broken point is a checked certificate.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .attack import cross_entropy
from .model_io import autocast, check_in_box, check_label_dtype, eval_mode, predict, unit_float
from .ops import launch_pgd_step_

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": ATTACKS, "fast": ("apgd-ce", "apgd-t")}
NORMS = {"linf": "Linf", "l2": "L2"}  # this project's names -> torchattacks'
STEPS, RHO, TARGETS, FAB_STEPS, SQUARE_QUERIES, SQUARE_P_INIT = 100, 0.75, 9, 100, 5000, 0.8
# slack of the ball check on returned points: fp32 rounding of x + delta, not a looser budget
BALL_TOLERANCE = 1e-5


def needs_torchattacks(version: str) -> bool:
    return any(a in ("fab-t", "square") for a in VERSIONS[version])


def torchattacks_missing() -> str | None:
    """Why FAB-T and Square cannot run here, or None when they can."""
    if importlib.util.find_spec("torchattacks") is None:
        return ("the standard AutoAttack's FAB-T and Square come from torchattacks, which is not installed "
                "(pip install --no-deps torchattacks)")
    return None


# ---------------------------------------------------------------------------------------------
# APGD on the per-sample projection

def dlr_targeted_loss(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): the targeted, scale-invariant DLR loss."""
    z = logits.float()
    s = z.sort(dim=1)[0]
    rows = torch.arange(z.shape[0], device=z.device)
    return -(z[rows, y] - z[rows, y_target]) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): the untargeted DLR loss."""
    z = logits.float()
    s, order = z.sort(dim=1)
    rows = torch.arange(z.shape[0], device=z.device)
    top_is_y = order[:, -1] == y
    best_other = torch.where(top_is_y, s[:, -2], s[:, -1])
    return -(z[rows, y] - best_other) / (s[:, -1] - s[:, -3] + 1e-12)


def apgd_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """APGD's random start: a random direction scaled to the ball's surface (linf: uniform
    coordinates scaled so the largest is eps; l2: a Gaussian scaled to length eps), clamped."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device) - 1
        scale = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device)
        scale = t.flatten(1).norm(dim=1)
    return (x + eps * t / (scale.view(-1, *[1] * (x.dim() - 1)) + 1e-12)).clamp(0.0, 1.0)


def attack_loss(logits: Tensor, y: Tensor, y_target: Tensor | None, loss: str) -> Tensor:
    if loss == "ce":
        return cross_entropy(logits, y)
    return dlr_loss(logits, y) if loss == "dlr" else dlr_targeted_loss(logits, y, y_target)


def _loss_and_grad(model, x_adv: Tensor, y: Tensor, y_target: Tensor | None, loss: str,
                   amp_dtype) -> tuple[Tensor, Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast(x_adv.device, amp_dtype):
            logits = model(x_adv)
        value = attack_loss(logits.float(), y, y_target, loss)
        (grad,) = torch.autograd.grad(value.sum(), x_adv)
    return logits.detach(), value.detach(), grad


def apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, start: Tensor, loss: str = "ce",
             y_target: Tensor | None = None, group: Tensor | None = None, steps: int = STEPS, norm: str = "linf",
             rho: float = RHO, amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """One APGD run on float32 rows x in [0, 1] from `start` (model in eval mode): the momentum
    step of Croce & Hein with the step size halved, and the run sent back to its best point, at
    the checkpoints where the loss oscillated or stopped improving. Every row's run is independent
    of the others, so any stacking of rows (points x targets) gives each row the same run, and a
    row leaves the batch once it is misclassified: the rest of its run could not make its point
    robust again, and the rows still running need the forward/backward. group: (N,) ids of the
    rows that attack one point (APGD-T's stacked targets): they all leave once one of them is
    misclassified. Returns (fooled: (N,) bool, x_adv: the first misclassified iterate where
    fooled, the start elsewhere)."""
    n = x.shape[0]
    first_check, min_check = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1)
    check_decrease = max(int(0.03 * steps), 1)
    x_fooled = start.detach().clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = torch.arange(n, device=x.device)  # the original row of each row still running
    eps_rows = torch.full((n,), float(eps), device=x.device)
    st = dict(x=x, y=y, y_target=y_target, group=group, x_adv=start.detach().clone(), eps=eps_rows,
              step=2.0 * eps_rows)
    logits, value, grad = _loss_and_grad(model, st["x_adv"], y, y_target, loss, amp_dtype)
    st.update(grad=grad, x_best=st["x_adv"].clone(), grad_best=grad.clone(), loss_best=value.clone(),
              loss_best_at_check=value.clone(), reduced_at_check=torch.ones(n, dtype=torch.bool, device=x.device),
              x_prev=st["x_adv"].clone(), history=torch.zeros(steps, n, device=x.device))

    def drop_fooled(wrong: Tensor) -> None:
        nonlocal rows
        if not wrong.any():  # nothing to drop: no copy of the running state
            return
        fooled[rows[wrong]] = True
        x_fooled[rows[wrong]] = st["x_adv"][wrong]
        keep = ~wrong
        if group is not None:
            point_done = torch.zeros(int(group.max()) + 1, dtype=torch.bool, device=x.device)
            point_done[st["group"][wrong]] = True
            keep &= ~point_done[st["group"]]
        rows = rows[keep]
        for key, t in st.items():
            if t is not None:
                st[key] = t[:, keep] if key == "history" else t[keep]

    drop_fooled(logits.argmax(1) != y)
    check_every, since_check = first_check, 0
    for i in range(steps):
        if rows.numel() == 0:
            break
        with torch.no_grad():
            x_adv = st["x_adv"]
            momentum = x_adv - st["x_prev"]
            st["x_prev"] = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            m = rows.numel()
            ascend = torch.ones(m, device=x.device)
            stepped = launch_pgd_step_(x_adv.clone(), st["x"], st["grad"], ascend, st["eps"], st["step"], norm, 0.0, 1.0)
            mixed = x_adv + (stepped - x_adv) * a + momentum * (1 - a)
            # the projection: a step of size 0 from the mixed point
            x_adv = launch_pgd_step_(mixed, st["x"], torch.zeros_like(mixed), ascend, st["eps"],
                                     torch.zeros(m, device=x.device), norm, 0.0, 1.0)
        logits, value, grad = _loss_and_grad(model, x_adv, st["y"], st["y_target"], loss, amp_dtype)
        with torch.no_grad():
            st["x_adv"], st["grad"] = x_adv, grad
            st["history"][i] = value
            better = value > st["loss_best"]
            for key, new in (("x_best", x_adv), ("grad_best", grad), ("loss_best", value)):
                st[key][better] = new[better]
            since_check += 1
            if since_check == check_every:
                # the loss rose in at most rho of the last steps (the reference's count, whose first
                # window reaches one row before the history starts), or it did not improve since the
                # last checkpoint that did not reduce the step
                now = torch.arange(i, i - check_every, -1, device=x.device)
                hist = st["history"]
                rises = (hist[now % steps] > hist[(now - 1) % steps]).sum(0)
                reduce = (rises.float() <= check_every * rho) | (
                    ~st["reduced_at_check"] & (st["loss_best_at_check"] >= st["loss_best"]))
                st["reduced_at_check"], st["loss_best_at_check"] = reduce, st["loss_best"].clone()
                st["step"] = torch.where(reduce, st["step"] / 2, st["step"])
                st["x_adv"][reduce], st["grad"][reduce] = st["x_best"][reduce], st["grad_best"][reduce]
                check_every, since_check = max(check_every - check_decrease, min_check), 0
            drop_fooled(logits.argmax(1) != st["y"])
    return fooled, x_fooled


def target_classes(logits: Tensor, n_targets: int) -> Tensor:
    """(N, n_targets): the 2nd, 3rd, ... most likely classes of each row (the wrong classes with
    the highest logits for a correctly classified point), as the reference orders them."""
    order = logits.sort(dim=1)[1]
    return torch.stack([order[:, -(k + 2)] for k in range(n_targets)], dim=1)


def _rows_in_chunks(n: int, per_chunk: int):
    for s in range(0, n, per_chunk):
        yield s, min(s + per_chunk, n)


def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", loss: str = "ce",
         steps: int = STEPS, rho: float = RHO, n_targets: int = TARGETS, stack_targets: bool | None = None,
         batch_size: int = 500, generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
         on_rows: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """APGD with loss "ce", "dlr" or "dlr-targeted" (APGD-T: one run per target class among the
    n_targets most likely wrong ones), 1 restart, on the correctly classified rows of x (float in
    [0, 1]); model in eval mode. Returns (robust: (N,) bool, x_adv: float32, a misclassified input
    where not robust and x elsewhere).

    stack_targets: APGD-T's targets of a point run as one stacked batch (rows = points x targets,
    `batch_size` rows a forward); False runs them one after the other, each on the points every
    earlier target left robust, drawing each start in the reference implementation's order (so a
    generator seeded as torch.manual_seed gives its exact starts). None (default): stacked on
    CUDA only; on a CPU the stacked batches measured 0.63x the sequential throughput
    (benchmarks/RESULTS.md). `on_rows(points done)` reports
    progress."""
    if loss not in ("ce", "dlr", "dlr-targeted"):
        raise ValueError(f"loss must be 'ce', 'dlr' or 'dlr-targeted', got {loss!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    x, y = x.detach().float(), y.long()
    if stack_targets is None:
        stack_targets = x.device.type == "cuda"
    robust = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    x_adv = x.clone()
    done = 0
    # only the correctly classified rows are attacked
    for s, e in _rows_in_chunks(x.shape[0], batch_size):
        logits = predict(model, x[s:e], amp_dtype)
        robust[s:e] = logits.argmax(1) == y[s:e]
    idx = robust.nonzero().squeeze(1)
    if idx.numel() == 0:
        return robust, x_adv
    if loss != "dlr-targeted":
        for s, e in _rows_in_chunks(idx.numel(), batch_size):
            rows = idx[s:e]
            start = apgd_start(x[rows], eps, norm, generator)
            fooled, xa = apgd_run(model, x[rows], y[rows], eps, start=start, loss=loss, steps=steps, norm=norm,
                                  rho=rho, amp_dtype=amp_dtype)
            robust[rows[fooled]] = False
            x_adv[rows[fooled]] = xa[fooled]
            done += rows.numel()
            if on_rows is not None:
                on_rows(done)
        return robust, x_adv
    num_classes = logits.shape[1]
    if num_classes < 4:
        raise ValueError(f"APGD-T's DLR loss needs at least 4 classes, the model has {num_classes}")
    n_targets = min(n_targets, num_classes - 1)
    if not stack_targets:
        total = idx.numel()
        for k in range(n_targets):
            idx = robust.nonzero().squeeze(1)
            for s, e in _rows_in_chunks(idx.numel(), batch_size):
                rows = idx[s:e]
                y_target = target_classes(predict(model, x[rows], amp_dtype), n_targets)[:, k]
                start = apgd_start(x[rows], eps, norm, generator)
                fooled, xa = apgd_run(model, x[rows], y[rows], eps, start=start, loss=loss, y_target=y_target,
                                      steps=steps, norm=norm, rho=rho, amp_dtype=amp_dtype)
                robust[rows[fooled]] = False
                x_adv[rows[fooled]] = xa[fooled]
            if on_rows is not None:
                on_rows(total * (k + 1) // n_targets)
        return robust, x_adv
    points_per_chunk = max(1, batch_size // n_targets)
    for s, e in _rows_in_chunks(idx.numel(), points_per_chunk):
        rows = idx[s:e]
        m = rows.numel()
        xs, ys = x[rows], y[rows]
        y_target = target_classes(predict(model, xs, amp_dtype), n_targets).t().reshape(-1)  # target-major
        x_stack, y_stack = xs.repeat(n_targets, *[1] * (x.dim() - 1)), ys.repeat(n_targets)
        start = torch.cat([apgd_start(xs, eps, norm, generator) for _ in range(n_targets)])
        group = torch.arange(m, device=x.device).repeat(n_targets)
        fooled, xa = apgd_run(model, x_stack, y_stack, eps, start=start, loss=loss, y_target=y_target, group=group,
                              steps=steps, norm=norm, rho=rho, amp_dtype=amp_dtype)
        fooled = fooled.view(n_targets, m)
        xa = xa.view(n_targets, m, *x.shape[1:])
        # the first target that fooled a point gives its adversarial input
        first = fooled.float().argmax(0)
        hit = fooled.any(0)
        robust[rows[hit]] = False
        x_adv[rows[hit]] = xa[first[hit], hit.nonzero().squeeze(1)]
        done += m
        if on_rows is not None:
            on_rows(done)
    return robust, x_adv


# ---------------------------------------------------------------------------------------------
# FAB-T and Square from torchattacks, at the standard parameters

class _Autocast(nn.Module):
    """The model under autocast, logits back in float32 (torchattacks calls the model itself)."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype):
        super().__init__()
        self.model, self.amp_dtype = model, amp_dtype

    def forward(self, x):
        with autocast(x.device, self.amp_dtype):
            return self.model(x).float()


def torchattacks_attack(name: str, model: nn.Module, eps: float, norm: str, num_classes: int, seed: int,
                        device: torch.device) -> "AttackFn":
    """FAB-T or Square at the standard parameters, as an attack of `run_attacks`. torchattacks
    seeds the global generator; the caller's generator state is restored after every call."""
    import torchattacks

    if name == "fab-t":
        attack = torchattacks.FAB(model, norm=NORMS[norm], eps=eps, steps=FAB_STEPS, n_restarts=1, alpha_max=0.1,
                                  eta=1.05, beta=0.9, seed=seed, multi_targeted=True, n_classes=num_classes)
        attack.n_target_classes = min(TARGETS, num_classes - 1)  # the standard's 9, not all other classes
    elif name == "square":
        attack = torchattacks.Square(model, norm=NORMS[norm], eps=eps, n_queries=SQUARE_QUERIES, n_restarts=1,
                                     p_init=SQUARE_P_INIT, loss="margin", resc_schedule=False, seed=seed)
    else:
        raise ValueError(f"torchattacks provides 'fab-t' and 'square' here, not {name!r}")

    def run(xb: Tensor, yb: Tensor, _on_rows) -> Tensor:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return attack(xb, yb)
    return run


# ---------------------------------------------------------------------------------------------
# the pipeline

@dataclass
class AutoAttackResult:
    """Per-point outcome of one AutoAttack evaluation (rows in the order of x)."""
    clean_correct: Tensor          # (N,) bool
    robust: Tensor                 # (N,) bool: correct and survived every attack
    x_adv: Tensor                  # (N, ...) float32 on the CPU: the breaking input, or x where robust
    version: str
    attacks: tuple[str, ...]
    eps: float
    norm: str
    robust_after: dict[str, Tensor] = field(default_factory=dict)  # (N,) bool: still robust after each attack
    seconds: dict[str, float] = field(default_factory=dict)
    rejected: int = 0              # misclassified points an attack returned outside the ball (not counted)

    @property
    def accuracy(self) -> float:
        """Robust accuracy in percent."""
        return 100.0 * self.robust.float().mean().item() if self.robust.numel() else 0.0


AttackFn = Callable[[Tensor, Tensor, Callable[[int], None]], Tensor]


def _inside(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    in_box = (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
    return (size <= eps + BALL_TOLERANCE) & in_box & torch.isfinite(x_adv.flatten(1)).all(1)


def run_attacks(model: nn.Module, x: Tensor, y: Tensor, attacks: dict[str, AttackFn], *, eps: float, norm: str,
                batch_size: int, device: torch.device, version: str = "custom",
                progress: Callable[[str, int], Callable[[int], None]] | None = None) -> AutoAttackResult:
    """The worst case per point over `attacks` (name -> fn(x_batch, y_batch, on_rows) -> x_adv),
    run in order, each on the points every earlier one left robust, `batch_size` points a call.
    A returned input breaks its point only if it is misclassified, inside the eps-ball and the
    [0, 1] box. x, y may live on the CPU (uint8 images are pixels / 255)."""
    n = y.shape[0]
    robust = torch.zeros(n, dtype=torch.bool)
    x_adv = torch.empty(x.shape, dtype=torch.float32)
    for s, e in _rows_in_chunks(n, batch_size):
        xb = unit_float(x[s:e].to(device))
        robust[s:e] = (predict(model, xb).argmax(1) == y[s:e].to(device)).cpu()
        x_adv[s:e] = xb.cpu()
    result = AutoAttackResult(robust.clone(), robust, x_adv, version, tuple(attacks), eps, norm)
    for name, attack in attacks.items():
        t0 = time.time()
        idx = robust.nonzero().squeeze(1)
        report = progress(name, idx.numel()) if progress is not None else (lambda _done: None)
        for s, e in _rows_in_chunks(idx.numel(), batch_size):
            rows = idx[s:e]
            xb = unit_float(x[rows].to(device))
            yb = y[rows].to(device).long()
            xa = attack(xb, yb, lambda done, base=s: report(base + done)).detach().float()
            wrong = predict(model, xa).argmax(1) != yb
            broken = wrong & _inside(xa, xb, eps, norm)
            result.rejected += int((wrong & ~broken).sum())
            broken = broken.cpu()
            robust[rows[broken]] = False
            x_adv[rows[broken]] = xa[broken.to(device)].cpu()
            report(e)
        result.robust_after[name] = robust.clone()
        result.seconds[name] = round(time.time() - t0, 2)
    return result


def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int, norm: str = "linf",
               version: str = "standard", batch_size: int = 500, seed: int = 0,
               amp_dtype: torch.dtype | None = None, progress: bool | Callable[[str, int], Callable[[int], None]] = False,
               device: torch.device | None = None) -> AutoAttackResult:
    """AutoAttack `version` ("standard": APGD-CE, APGD-T, FAB-T, Square; "fast": APGD-CE + APGD-T,
    a named subset, not the standard) of `model` on (x, y) at budget `eps` in `norm` ("linf" or
    "l2"), in fp32 unless `amp_dtype` is given. num_classes: the data set's class count (not
    y.max() + 1, which a subset without the last class gets wrong); the model must have that many
    outputs. x: float in [0, 1] or uint8 pixels, on any device (batches go to `device`, default
    the model's). progress: True for lines with rate and ETA per attack, or a factory
    (attack name, points) -> on_done(points done). Returns per-point results (AutoAttackResult)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (the data set's class count), got {num_classes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[:1] != y.shape[:1]:
        raise ValueError("x and y must be tensors with one label per image")
    check_label_dtype(y)
    if needs_torchattacks(version) and (why := torchattacks_missing()):
        raise ImportError(f"{why}; or use version='fast' (APGD-CE + APGD-T, not the standard)")
    device = device or next(model.parameters()).device
    if x.dtype != torch.uint8:
        check_in_box(x, 0.0, 1.0)
    with eval_mode(model):
        outputs = predict(model, unit_float(x[:1].to(device))).shape[1]
        if outputs != num_classes:
            raise ValueError(f"num_classes is {num_classes} but the model has {outputs} outputs")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
        generator = torch.Generator(device=device).manual_seed(seed)
        target = _Autocast(model, amp_dtype) if amp_dtype is not None else model

        def apgd_attack(loss):
            def run(xb, yb, on_rows):
                robust, xa = apgd(model, xb, yb, eps=eps, norm=norm, loss=loss, batch_size=batch_size,
                                  generator=generator, amp_dtype=amp_dtype, on_rows=on_rows)
                return xa
            return run

        def from_torchattacks(name):
            return torchattacks_attack(name, target, eps, norm, num_classes, seed, device)

        makers = {"apgd-ce": lambda: apgd_attack("ce"), "apgd-t": lambda: apgd_attack("dlr-targeted"),
                  "fab-t": lambda: from_torchattacks("fab-t"), "square": lambda: from_torchattacks("square")}
        attacks = {name: makers[name]() for name in VERSIONS[version]}
        if progress is True:
            from .runtime import ProgressLines

            def progress(name, points):
                lines = ProgressLines(f"AutoAttack {version}: {name} on {points} points", max(points, 1))
                return lines.update
        return run_attacks(model, x, y, attacks, eps=float(eps), norm=norm, batch_size=batch_size, device=device,
                           version=version, progress=progress or None)
