"""AAATrainer: the drop-in training step for AAA and its baselines (METHOD.md).

    config = AAAConfig()                              # every setting, per-method defaults filled in
    meta_net = make_meta_net(config).to(device)
    trainer = AAATrainer(model, optimizer, meta_net=meta_net, meta_optimizer=make_meta_optimizer(config, meta_net),
                         config=config)
    for x, y in loader:
        stats = trainer.step(x, y, x_meta, y_meta)    # a meta batch every step; used every k-th
    epoch_means = trainer.read_stats()                # one host synchronisation
    trainer.end_epoch(x_meta_all, y_meta_all)         # fairness multipliers, class-loss features
    (the CLI calls trainer.update_fairness(x_meta_all, y_meta_all) at each epoch's start instead,
    as the reference does, and end_epoch(fairness=False) at its end)

A step makes no host synchronisation (after the first batch) when its optimizer is fused, e.g.
torch.optim.SGD(..., fused=True): the GPU runs ahead of Python until something is read.

Every method (aaa_fast.methods: one file each, a registry) runs through the same step: the
method builds the rows it trains on (none, PGD-CE, TRADES-KL, or the AAA pair as one 2N batch),
the engine makes one train-mode forward of all rows concatenated (BatchNorm statistics are taken
over that mixed batch), the method's loss, one backward, the optimizer step.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .attack import AttackGraphs, attack_rows, build_pair
from .evaluation import classwise_accuracy
from .fairness import FairnessMultipliers
from .meta import HIDDEN, INIT_TEMPERATURE, META_INITS, S_RANGE, START_A, MetaNet
from .methods import DEFAULTS, Batch, get_method, method_names, step_stat_names
from .model_io import (AMP, AMP_CHOICES, autocast, box_error, check_in_box, check_label_dtype, check_labels, check_logits,
                       eval_mode, label_error, predict, resolve_precision, unit_float)
from .objective import INITIAL_CLASS_LOSS, OBJECTIVES
# the collapse guard that goes with each way of starting the meta-network (1.0: off, as the reference)
INIT_ANTI_CAP = {"trades": 0.5, "reference": 1.0}
GRAD_BAND = 1e-3  # a row whose a(1 - a) is above this still gets a meta-gradient (diagnostics)
BOUND_MODES = ("fixed", "remargin", "meta")
class StepStats(Mapping):
    """One step's statistics, kept on the device: reading any value copies them all to the host
    at once (one synchronisation), so a loop that never reads them never waits for the GPU.
    Keys: step_stat_names(method), "meta_grad_norm" on meta steps, "dropped_share" on min_row_weight's
    measuring steps, "skipped" (no update was applied), and
    the host-side "meta_step" and "iteration"."""

    def __init__(self, values: dict[str, Tensor], host: dict):
        self._values, self._host, self._read = values, host, None

    def _all(self) -> dict:
        if self._read is None:
            names = list(self._values)
            numbers = torch.stack([self._values[k].float() for k in names]).tolist() if names else []
            self._read = dict(zip(names, numbers), **self._host)
            self._read["skipped"] = bool(self._read.get("skipped", False))
        return self._read

    def __getitem__(self, key):
        return self._all()[key]

    def __iter__(self):
        return iter([*self._values, *self._host])

    def __len__(self) -> int:
        return len(self._values) + len(self._host)


def fill_defaults(settings, *, default_eps: float | None = None) -> None:
    """Sets each of eps, alpha, lam, bound_mode, fairness, temperature and anti_cap that
    `settings` (an AAAConfig, or the CLI's arguments, so that config.json records the values
    used) leaves at None: eps, lam, bound_mode and fairness from the method's file (its
    `defaults`, else methods.base.DEFAULTS), eps from `default_eps` (a data set's) when given;
    alpha: eps / 4; temperature and anti_cap: those of settings.meta_init."""
    method = get_method(settings.method)
    defaults = {key: method.default(key) for key in DEFAULTS}
    if default_eps is not None:
        defaults["eps"] = default_eps
    defaults.update(temperature=INIT_TEMPERATURE[settings.meta_init], anti_cap=INIT_ANTI_CAP[settings.meta_init])
    for key, value in defaults.items():
        if getattr(settings, key) is None:
            setattr(settings, key, value)
    if settings.alpha is None:
        settings.alpha = settings.eps / 4


def check_number(name: str, value) -> None:
    """A setting that must be a finite number >= 0 that float32 holds (NaN, bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 <= value <= torch.finfo(torch.float32).max):
        raise ValueError(f"{name} must be finite and >= 0 (a number float32 holds), got {value!r}")


@dataclass
class AAAConfig:
    method: str = "aaa"              # a registered method (aaa_fast.methods.method_names())
    num_classes: int = 10
    # a field left at None takes its per-method default from fill_defaults
    eps: float | None = None         # base bound eps_0, pixel units; the method's default (8/255, aaa*: 10/255)
    alpha: float | None = None       # attack step; eps / 4
    steps: int = 10                  # attack steps K
    lam: float | None = None         # TRADES trade-off lambda; the method's default (6, aaa*: 1.5)
    adv_loss: str = "kl"             # adversarial examples: "kl" (TRADES) or "ce" (PGD-CE)
    norm: str = "linf"
    bound_mode: str | None = None    # fixed | remargin | meta; default: remargin for frl/aaa*, else fixed
    fairness: bool | None = None     # FRL multipliers; default: on for frl and aaa*, off otherwise
    objective: str = "kl-all"        # kl-all (extension: KL term for every row) | paper
    meta_init: str = "trades"        # trades (learnable start on the TRADES side) | reference (authors' code)
    temperature: float | None = None  # T of the meta-net's softmax; default 0.05 (trades init), 1e-3 (reference)
    anti_cap: float | None = None    # collapse guard: the meta objective pays mean_i b_i - anti_cap when
                                     # positive; default 0.5 (trades init), 1.0 = off (reference)
    s_min: float = S_RANGE[0]        # meta bounds: s_i in [s_min, s_max]
    s_max: float = S_RANGE[1]
    meta_hidden: int = HIDDEN        # the meta-network's hidden width
    meta_start_a: float = START_A    # trades init: the a_i every row starts at
    meta_lr: float = 1e-4            # the meta-network's Adam (make_meta_optimizer)
    meta_weight_decay: float = 5e-4
    meta_every: int = 50             # k: one meta step every k iterations
    fixed_weights: tuple[float, float] = (0.5, 0.5)  # aaa-fixed: (a_i, b_i) for every sample
                                     # (aaa-oracle: a_i = 0, b_i = 1 on corrupted-label rows, else 1, 0)
    class_share: Sequence[float] | None = None       # feature 6; None: balanced
    tau: float = 0.07                # FRL tolerance
    rho1: float = 0.05               # FRL step for nu, eta (halved every 40 updates)
    rho2: float = 0.2                # FRL step for mu
    fairness_eval_eps: float = 8 / 255   # PGD-20 budget of the per-epoch class-wise errors
    fairness_eval_steps: int = 20
    amp: str = "none"                # none | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False
    compile: bool = False            # torch.compile the model for the attacks and the real step; the
                                     # lookahead stays eager (a compiled backward cannot be differentiated)
    cuda_graphs: bool = True         # on CUDA without compile: replay each attack's K steps from a CUDA
                                     # graph captured once per batch shape (the meta bounds mode excepted)
    min_row_weight: float = 0.0      # tau (0 = off): on plain steps of the row-choosing methods, rows with
                                     # b_i < tau get no anti-adversarial example (paper objective: a_i < tau, no
                                     # adversarial one); every meta_every-th step attacks every row and measures
                                     # the share of the objective skipping drops. One host synchronisation per
                                     # plain step (the kept count); kept counts are rounded up to 1/8 of the batch
    seed: int = 0                    # the attacks' random starts
    skip_nonfinite: bool = False     # skip (and count) a step with a NaN/inf loss instead of raising

    def __post_init__(self):
        method = get_method(self.method)
        if self.meta_init not in META_INITS:
            raise ValueError(f"meta_init must be one of {META_INITS}, got {self.meta_init!r}")
        if self.eps is not None:
            check_number("eps", self.eps)  # before fill_defaults derives alpha from it
        fill_defaults(self)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not 0 <= self.anti_cap <= 1:
            raise ValueError(f"anti_cap must be in [0, 1] (1 = no guard), got {self.anti_cap}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.bound_mode not in BOUND_MODES:
            raise ValueError(f"bound_mode must be one of {BOUND_MODES}, got {self.bound_mode!r}")
        if self.bound_mode == "meta" and not method.learns_bounds:
            raise ValueError(f"bound_mode='meta' needs a method whose meta-network gives the bounds "
                             f"({list(method_names('learns_bounds'))}), "
                             f"not {self.method!r}")
        for name, low in (("num_classes", 2), ("steps", 0), ("meta_hidden", 1), ("meta_every", 1),
                          ("fairness_eval_steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("eps", "alpha", "lam", "fairness_eval_eps", "meta_lr", "meta_weight_decay", "tau", "rho1", "rho2"):
            check_number(name, getattr(self, name))
        for name in ("fairness", "channels_last", "compile", "cuda_graphs", "skip_nonfinite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 < self.meta_start_a < 1:
            raise ValueError(f"meta_start_a must be in (0, 1), got {self.meta_start_a}")
        if self.adv_loss not in ("kl", "ce"):
            raise ValueError(f"adv_loss must be 'kl' or 'ce', got {self.adv_loss!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.class_share is not None:
            share = list(self.class_share) if isinstance(self.class_share, (list, tuple)) else None
            if share is None or len(share) != self.num_classes:
                raise ValueError(f"class_share needs {self.num_classes} values (a list of numbers), got {self.class_share!r}")
            for value in share:
                check_number("class_share", value)
            if not sum(share) > 0:
                raise ValueError(f"class_share must not be all zero, got {share}")
        if not (math.isfinite(self.s_min) and math.isfinite(self.s_max) and 0 < self.s_min <= self.s_max):
            raise ValueError(f"the meta bounds need 0 < s_min <= s_max, got s_min={self.s_min}, s_max={self.s_max}")
        if len(self.fixed_weights) != 2:
            raise ValueError(f"fixed_weights must be two numbers >= 0, got {self.fixed_weights}")
        for value in self.fixed_weights:
            check_number("fixed_weights", value)
        check_number("min_row_weight", self.min_row_weight)
        if not 0 <= self.min_row_weight < 1:
            raise ValueError(f"min_row_weight must be in [0, 1) (0 = off), got {self.min_row_weight}")
        if self.min_row_weight > 0 and not method.chooses_rows:
            raise ValueError(f"min_row_weight skips rows by their chosen weights: it needs a method that chooses "
                             f"them ({list(method_names('chooses_rows'))}), not {self.method!r}")
        method.check_config(self)


# the flags that map onto AAAConfig fields take their defaults from here (one home per setting)
CONFIG_DEFAULTS = {field.name: field.default for field in dataclasses.fields(AAAConfig)}


def make_meta_net(config: AAAConfig, *, seed: int | None = None) -> MetaNet:
    """The meta-network `config` describes (init, width, temperature, bound head), its initial
    weights drawn from `seed` when given (without touching the global random state)."""
    def build():
        return MetaNet(hidden=config.meta_hidden, temperature=config.temperature, bound_head=config.bound_mode == "meta",
                       s_min=config.s_min, s_max=config.s_max, init=config.meta_init, start_a=config.meta_start_a)
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_meta_optimizer(config: AAAConfig, meta_net: MetaNet) -> torch.optim.Adam:
    """The meta-network's Adam with config.meta_lr and .meta_weight_decay (fused on CUDA, so a
    meta step does not wait for the GPU)."""
    fused = next(meta_net.parameters()).is_cuda
    return torch.optim.Adam(meta_net.parameters(), lr=config.meta_lr, weight_decay=config.meta_weight_decay, fused=fused)


def check_optimizes(name: str, optimizer, module_name: str, module: nn.Module) -> None:
    """The optimizer must update the module's parameters (some of them: frozen layers are fine),
    and no others: one built on another model would silently train nothing."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{module_name} must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in module.parameters()}
    if not own:
        raise ValueError(f"{module_name} has no parameters to train")
    held = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = sum(id(p) not in own for p in held)
    if foreign or not held:
        raise ValueError(f"{name} holds {foreign} parameters that are not {module_name}'s (of {len(held)}): build it "
                         f"from {module_name}.parameters()")


def check_optimizer_state(name: str, optimizer: torch.optim.Optimizer, saved) -> None:
    """Refuse a saved optimizer state whose parameter groups do not match `optimizer`'s (count
    and size), before anything is loaded: torch's own check comes after the model's weights."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        raise ValueError(f"trainer state has no {name} state")
    own = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    keys = lambda g: set(g) - {"params"}  # noqa: E731
    if groups and isinstance(groups[0], dict) and keys(groups[0]) != keys(optimizer.param_groups[0]):
        raise ValueError(f"trainer state's {name} is of another optimizer (settings {sorted(keys(groups[0]))}, this "
                         f"trainer's {sorted(keys(optimizer.param_groups[0]))}); nothing was loaded")
    if own != theirs:
        raise ValueError(f"trainer state's {name} has parameter groups of sizes {theirs}, this trainer's {own}; "
                         "nothing was loaded")


def check_module_state(name: str, module: nn.Module, saved) -> None:
    """Refuse, naming the first differences, a saved state_dict that does not fit `module` (other
    keys or shapes: e.g. another meta_hidden), before any of it is loaded."""
    if not isinstance(saved, dict):
        raise ValueError(f"trainer state has no {name} weights")
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & saved.keys()
              if tuple(saved[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shapes saved vs here: {', '.join(sorted(shapes)[:3])}" if shapes else ""]
        raise ValueError(f"trainer state's {name} does not fit this trainer ({'; '.join(p for p in parts if p)}); "
                         "nothing was loaded")


class AAATrainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, meta_net: MetaNet | None = None,
                 meta_optimizer: torch.optim.Optimizer | None = None, config: AAAConfig | None = None):
        cfg = config or AAAConfig()
        device = next(model.parameters()).device
        # amp "auto": bf16 autocast + channels_last where the device computes in bf16, else fp32
        amp, channels_last, self.amp_choice = resolve_precision(cfg.amp, cfg.channels_last, device)
        if (amp, channels_last) != (cfg.amp, cfg.channels_last):
            cfg = dataclasses.replace(cfg, amp=amp, channels_last=channels_last)
        self.config = cfg
        method = get_method(cfg.method)
        method.check_trainer(optimizer, meta_net, meta_optimizer, cfg)
        check_optimizes("optimizer", optimizer, "model", model)
        if meta_net is not None and meta_optimizer is not None:
            check_optimizes("meta_optimizer", meta_optimizer, "meta_net", meta_net)
        self.model, self.optimizer = model, optimizer
        self.meta_net, self.meta_optimizer = meta_net, meta_optimizer
        self.device = device
        if meta_net is not None:
            meta_net.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.net = torch.compile(model) if cfg.compile else model  # forwards outside the lookahead
        use_graphs = cfg.cuda_graphs and self.device.type == "cuda" and not cfg.compile
        self.attack_graphs = AttackGraphs(cfg.steps, cfg.norm, AMP[cfg.amp]) if use_graphs else None
        c = cfg.num_classes
        self.amp_dtype = AMP[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.fairness = FairnessMultipliers(c, tau=cfg.tau, rho1=cfg.rho1, rho2=cfg.rho2)
        self._refresh_fairness_tensors()
        share = torch.full((c,), 1 / c) if cfg.class_share is None else torch.as_tensor(cfg.class_share, dtype=torch.float32)
        self.class_share = share.float().to(self.device)
        self.class_loss_avg = torch.full((c,), INITIAL_CLASS_LOSS, device=self.device)
        self._epoch_loss_sum = torch.zeros(c, dtype=torch.float64, device=self.device)
        self._epoch_loss_count = torch.zeros(c, dtype=torch.float64, device=self.device)
        self.iteration = 0
        self.last_choice: tuple[Tensor, Tensor] | None = None  # the last step's rows' (a, b)
        self.last_eps: Tensor | None = None  # and their bounds eps_i
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # Host synchronisations: none in a step once the first batch is checked. Later batches
        # already on the device are checked there and a bad one raises at the next read_stats();
        # with a fused optimizer a non-finite step is skipped on the device (found_inf) and
        # reported there too. Step statistics accumulate on the device until read_stats().
        self._device_skip = self._prepare_device_skip(optimizer)
        self._checked_first = {"batch": False, "meta batch": False}
        self._image_shape: tuple | None = None  # of the first batch: every later batch must match
        self._skipped_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stat_names = step_stat_names(cfg.method)
        # the device-side sums read_stats() reads: each stat over applied steps, then applied,
        # skipped, meta-gradient norm and the dropped share (min_row_weight's measuring steps)
        self._applied_slot, self._skipped_slot, self._meta_norm_slot, self._dropped_slot = range(
            len(self.stat_names), len(self.stat_names) + 4)
        self._stat_sums = torch.zeros(self._dropped_slot + 1, dtype=torch.float64, device=self.device)
        self._meta_steps = 0
        self._measured_steps = 0
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._seen_low = torch.full((2,), math.inf, device=self.device)   # (x, y) minima of deferred checks
        self._seen_high = torch.full((2,), -math.inf, device=self.device)
        # data parallelism: called with the model's (and the meta-net's) gradients before each
        # optimizer step, e.g. to average them across ranks (see aaa_fast.runtime.Distributed);
        # grad_reducer, when set, averages the model's gradients during the real step's backward
        # instead (runtime.OverlappedGradAverage), and grad_sync is left to the meta-net
        self.grad_sync: Callable[[list[Tensor]], None] | None = None
        self.grad_reducer = None
        self.method = method(self)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _prepare_device_skip(optimizer: torch.optim.Optimizer) -> bool:
        """True when `optimizer` can skip a step on the device (fused kernels take a found_inf
        flag). SGD's missing momentum buffers start at zero, which with dampening 0 is its own
        first step, so a skipped first step leaves no uninitialised buffer behind."""
        groups = optimizer.param_groups
        if not all(g.get("fused") for g in groups):
            return False
        if isinstance(optimizer, torch.optim.SGD):
            if any(g["momentum"] != 0 and g["dampening"] != 0 for g in groups):
                return False
            for g in groups:
                for p in g["params"] if g["momentum"] != 0 else []:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        return True

    def inputs(self, x: Tensor, y: Tensor, role: str = "batch") -> tuple[Tensor, Tensor]:
        """x as float in [0, 1] (uint8 scaled by 1/255), y as int64, both on the device. The first
        batch (and meta batch), and any batch still on the CPU of a GPU trainer, is checked here;
        other batches are checked on the device, out-of-range labels clamped so no kernel indexes
        out of bounds, and read_stats() raises the error (no synchronisation per step)."""
        check_label_dtype(y)
        if x.shape[:1] != y.shape:
            raise ValueError(f"{role}: x has {x.shape[0] if x.dim() else 0} rows but y has {y.shape[0]}")
        if y.shape[0] == 0:
            raise ValueError(f"{role} is empty: x and y need at least one row")
        if self._image_shape is None:
            self._image_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self._image_shape:  # a broadcasting or pooling model would hide it
            raise ValueError(f"{role} images have shape {tuple(x.shape[1:])}, but the trainer's first batch had "
                             f"{self._image_shape} (channels, height, width)")
        c = self.config.num_classes
        here = not self._checked_first[role] or (x.device.type == "cpu" and self.device.type != "cpu")
        self._checked_first[role] = True
        if here:
            if x.dtype != torch.uint8:
                check_in_box(x, 0.0, 1.0, allow_nan=True)  # NaN: the non-finite-loss path (stop or skip)
            check_labels(y, c)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True).long()
        if not here and y.numel():
            y_lo, y_hi = torch.aminmax(y)
            x_lo, x_hi = (y_lo.new_zeros(()), y_lo.new_zeros(())) if x.dtype == torch.uint8 else torch.aminmax(x)
            self._seen_low = torch.fmin(self._seen_low, torch.stack([x_lo.float(), y_lo.float()]))
            self._seen_high = torch.fmax(self._seen_high, torch.stack([x_hi.float(), y_hi.float()]))
            y = y.clamp(0, c - 1)
        x = unit_float(x)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _refresh_fairness_tensors(self) -> None:
        """Device copies of the class weights and bound multipliers, made when they change
        (not re-uploaded every step)."""
        weights = self.fairness.class_weights() if self.config.fairness else (None, None)
        self._u, self._v = (w if w is None else w.to(self.device) for w in weights)
        self._bound_multipliers = self.fairness.bound_multipliers().to(self.device)

    @property
    def class_weights(self) -> tuple[Tensor | None, Tensor | None]:
        """The FRL class weights (u, v) of the natural and boundary terms on the device (None: fairness off)."""
        return self._u, self._v

    def row_bounds(self, y: Tensor) -> Tensor:
        """eps_0 * m_{y_i}: class remargins in 'remargin' mode, 1 otherwise."""
        eps = torch.full(y.shape, self.config.eps, device=self.device)
        if self.config.bound_mode == "remargin":
            eps = eps * self._bound_multipliers[y.to(self.device)]
        return eps

    def attack(self, x: Tensor, y: Tensor, kind: str, eps_rows: Tensor, random_start) -> Tensor:
        """K ascent steps of the loss `kind` on every row of the validated batch (PGD-AT, TRADES, FRL)."""
        cfg, n = self.config, x.shape[0]
        clean_logits = self.clean_logits(x) if kind == "kl" else None
        with eval_mode(self.model):
            return attack_rows(self.net, x, y, kind, clean_logits, torch.ones(n, device=self.device), eps_rows,
                               torch.full((n,), cfg.alpha, device=self.device), steps=cfg.steps, norm=cfg.norm,
                               random_start=random_start, amp_dtype=self.amp_dtype, generator=self.generator,
                               graphs=self.attack_graphs)

    def pair(self, x: Tensor, y: Tensor, clean_logits: Tensor, eps_rows: Tensor, keep_unprojected: bool = False, *,
             adv_rows: Tensor | None = None, anti_rows: Tensor | None = None):
        """The AAA pair of the validated batch (attack.build_pair): adversarial examples of the
        rows adv_rows, then anti-adversarial ones of anti_rows (None: every row)."""
        cfg = self.config
        with eval_mode(self.model):
            return build_pair(self.net, x, y, clean_logits, eps_rows.repeat(2),
                              torch.full((2 * x.shape[0],), cfg.alpha, device=self.device), steps=cfg.steps,
                              adv_loss=cfg.adv_loss, norm=cfg.norm, random_start="normal",
                              amp_dtype=self.amp_dtype, generator=self.generator, keep_unprojected=keep_unprojected,
                              graphs=self.attack_graphs, adv_rows=adv_rows, anti_rows=anti_rows)

    def clean_logits(self, x: Tensor) -> Tensor:
        with eval_mode(self.model):
            return predict(self.net, x, self.amp_dtype, self.config.num_classes)

    def forward(self, rows: list[Tensor], model_call=None, amp_dtype: torch.dtype | None = None) -> list[Tensor]:
        """One train-mode forward of all rows concatenated (autocast to `amp_dtype`), split back."""
        call = model_call or self.net
        x = torch.cat(rows)
        with autocast(self.device, amp_dtype):
            logits = check_logits(call(x), x.shape[0], self.config.num_classes)
        return list(logits.split([r.shape[0] for r in rows]))

    # ------------------------------------------------------------------ the step
    def step(self, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *,
             corrupted: Tensor | None = None) -> dict:
        """One training iteration on (x, y); the meta batch is used on every `meta_every`-th
        iteration by method 'aaa'. `corrupted` (bool, (N,)): which labels are wrong, needed by
        the 'aaa-oracle' control only. Returns the step's StepStats (losses, frac_anti: share of
        rows with b > a; grad_band: share with a(1 - a) > 1e-3; meta_grad_norm on meta steps),
        kept on the device until read; read_stats() gives their means since its last call. The
        rows' (a, b) stay in `last_choice`."""
        model = self.model
        self.last_choice = self.last_eps = None
        x, y = self.inputs(x, y)
        n = x.shape[0]
        batch = Batch(x, y, self.row_bounds(y), *self.class_weights, x_meta, y_meta, corrupted)
        plan = self.method.prepare(batch)
        model.train()
        loss = self.method.loss(batch, self.forward(plan.rows, amp_dtype=self.amp_dtype), plan)
        bad = ~torch.isfinite(loss.total)
        if not self._device_skip and bad:  # a synchronisation, without a fused optimizer only
            return self._nonfinite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_reducer is not None:
            with self.grad_reducer.during_backward():
                self.scaler.scale(loss.total).backward()
        else:
            self.scaler.scale(loss.total).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self.grad_reducer is None and self.grad_sync is not None:
            self.grad_sync(grads)
        # fp16: the GradScaler skips steps with inf/NaN gradients and lowers its scale itself
        # (on the device with a fused optimizer); otherwise a non-finite gradient skips the step
        if not self.scaler.is_enabled():
            bad_grads = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            if not self._device_skip and bad_grads:
                self.optimizer.zero_grad(set_to_none=True)
                return self._nonfinite("gradient", loss)
            bad = bad | bad_grads
        if self._device_skip and not self.scaler.is_enabled():
            self.optimizer.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(batch, plan)
        ok = ~bad
        self._epoch_loss_sum.index_add_(0, y, torch.where(ok, loss.per_sample_ce, 0).double())
        self._epoch_loss_count.index_add_(0, y, ok.double().expand(n))
        a_rows = plan.a.float() if isinstance(plan.a, Tensor) else torch.full((n,), plan.a, device=self.device)
        b_rows = plan.b.float() if isinstance(plan.b, Tensor) else torch.full((n,), plan.b, device=self.device)
        self.last_choice = (a_rows, b_rows)
        self.last_eps = batch.eps if plan.eps is None else plan.eps
        meta_grad_norm = plan.meta_grad_norm
        values = {"loss": loss.total.detach(), **{k: t.detach() for k, t in loss.terms.items()},
                  "mean_eps": (batch.eps if plan.eps is None else plan.eps).mean(),
                  "frac_anti": (b_rows > a_rows).float().mean(),
                  "grad_band": (a_rows * (1 - a_rows) > GRAD_BAND).float().mean(),
                  "rows_attacked": torch.full((), plan.rows_attacked, device=self.device)}
        stats = torch.stack([values[k].float() for k in self.stat_names])
        meta_norm = meta_grad_norm.float() if meta_grad_norm is not None else stats.new_zeros(())
        dropped = loss.dropped_share.float() if loss.dropped_share is not None else stats.new_zeros(())
        # in slot order: stat_names (applied steps only), applied, skipped, meta-gradient norm, dropped share
        self._stat_sums += torch.cat([torch.where(ok, stats, 0), ok.view(1), bad.view(1), meta_norm.view(1),
                                      torch.where(ok, dropped, 0).view(1)]).double()
        self._meta_steps += meta_grad_norm is not None
        self._measured_steps += loss.dropped_share is not None
        self._record_bad(bad)
        self.iteration += 1
        if meta_grad_norm is not None:
            values["meta_grad_norm"] = meta_grad_norm
        if loss.dropped_share is not None:
            values["dropped_share"] = loss.dropped_share
        return StepStats(dict(values, skipped=bad), dict(meta_step=meta_grad_norm is not None, iteration=self.iteration))

    def _record_bad(self, bad: Tensor) -> None:
        self._skipped_total += bad
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.iteration, self._first_bad)

    def _nonfinite(self, what: str, loss) -> StepStats:
        """A non-finite step found on the host (no fused optimizer): raise, or skip and count it."""
        if not self.config.skip_nonfinite:
            terms = ", ".join(f"{k} {t.item()}" for k, t in loss.terms.items())
            raise FloatingPointError(f"non-finite training {what} at iteration {self.iteration} "
                                     f"(loss terms: {terms}); no update was applied")
        self._skipped_total += 1
        self._stat_sums[self._skipped_slot] += 1
        self.iteration += 1
        return StepStats({}, dict(loss=math.nan, skipped=True, iteration=self.iteration, meta_step=False))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far for a non-finite loss or gradient (reading it synchronises)."""
        return int(self._skipped_total)

    def read_stats(self) -> dict:
        """The step statistics since the last call, in one host synchronisation: the means of
        stat_names over the applied steps, "steps" (applied), "skipped", "meta_steps" and
        "meta_grad_norm" (mean over meta steps; None without one), "measured_steps" and
        "dropped_share" (min_row_weight: mean over the steps that attacked every row and measured
        the share of the objective skipping drops; None without one). Raises what the steps
        deferred: a batch outside the image box [0, 1] or with labels out of range
        (ValueError), a non-finite loss or gradient (FloatingPointError, unless skip_nonfinite;
        such a step applied no update)."""
        host = torch.cat([self._stat_sums, self._seen_low.double(), self._seen_high.double(),
                          self._first_bad.double().view(1)]).tolist()
        meta_steps, measured_steps = self._meta_steps, self._measured_steps
        self._stat_sums.zero_()
        self._seen_low.fill_(math.inf)
        self._seen_high.fill_(-math.inf)
        self._first_bad.fill_(-1)
        self._meta_steps = self._measured_steps = 0
        sums, steps, skipped, meta_sum, dropped_sum = host[:len(self.stat_names)], *host[self._applied_slot:
                                                                                          self._dropped_slot + 1]
        x_lo, y_lo, x_hi, y_hi, first_bad = host[self._dropped_slot + 1:]
        if x_lo < 0 or x_hi > 1:
            raise box_error("x", x_lo, x_hi, 0.0, 1.0)
        if y_lo < 0 or y_hi >= self.config.num_classes:
            raise label_error(int(y_lo), int(y_hi), self.config.num_classes)
        if first_bad >= 0 and not self.config.skip_nonfinite:
            raise FloatingPointError(f"non-finite training loss or gradient at iteration {int(first_bad)}; "
                                     "no update was applied in that step")
        out = {key: value / steps if steps else math.nan for key, value in zip(self.stat_names, sums)}
        out.update(steps=int(steps), skipped=int(skipped), meta_steps=meta_steps,
                   meta_grad_norm=meta_sum / meta_steps if meta_steps else None, measured_steps=measured_steps,
                   dropped_share=dropped_sum / measured_steps if measured_steps else None)
        return out

    # ------------------------------------------------------------------ epochs and state
    def reduce_epoch_losses(self, reduce_: Callable[[Tensor], None]) -> None:
        """Apply an in-place reduction (e.g. an all-reduce sum over data-parallel ranks) to this
        epoch's per-class loss sums and counts, before end_epoch turns them into features."""
        reduce_(self._epoch_loss_sum)
        reduce_(self._epoch_loss_count)

    def end_epoch(self, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *,
                  classwise_nat_err=None, classwise_bdy_err=None, batch_size: int = 256,
                  fairness: bool = True) -> dict:
        """Close an epoch: this epoch's class-average clean losses become feature 2, and (with
        fairness on, unless fairness=False because `update_fairness` runs at epoch starts) the
        multipliers are updated as `update_fairness` does."""
        seen = self._epoch_loss_count > 0
        avg = self._epoch_loss_sum / self._epoch_loss_count.clamp_min(1)
        self.class_loss_avg = torch.where(seen, avg.float(), self.class_loss_avg)
        self._epoch_loss_sum.zero_()
        self._epoch_loss_count.zero_()
        self.method.end_epoch()
        if not fairness:
            return {}
        return self.update_fairness(x_meta, y_meta, classwise_nat_err=classwise_nat_err,
                                    classwise_bdy_err=classwise_bdy_err, batch_size=batch_size)

    def update_fairness(self, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *,
                        classwise_nat_err=None, classwise_bdy_err=None, batch_size: int = 256) -> dict:
        """With fairness on, update the FRL multipliers from class-wise errors, either given or
        measured here on (x_meta, y_meta) with PGD-`fairness_eval_steps`. The reference calls
        this at the start of every epoch, the first included, so the multipliers act in every
        epoch. Returns the measured summary (empty when fairness is off or errors are given)."""
        cfg = self.config
        out = {}
        if not cfg.fairness:
            return out
        if classwise_nat_err is None or classwise_bdy_err is None:
            if x_meta is None or y_meta is None:
                raise ValueError("fairness is on: pass the meta set (x_meta, y_meta) or the class-wise errors")
            result = classwise_accuracy(self.model, x_meta, y_meta, cfg.num_classes, eps=cfg.fairness_eval_eps,
                                        steps=cfg.fairness_eval_steps, alpha=cfg.alpha, norm=cfg.norm, batch_size=batch_size,
                                        amp_dtype=self.amp_dtype, generator=self.generator)
            classwise_nat_err, classwise_bdy_err = result.nat_err, result.bdy_err
            out.update(result.summary())
        self.fairness.update(classwise_nat_err, classwise_bdy_err)
        self._refresh_fairness_tensors()
        return out

    def state_dict(self) -> dict:
        state = {
            "format": 1,
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "fairness": self.fairness.state_dict(),
            "class_loss_avg": self.class_loss_avg.cpu(),
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict(),
            "method_state": self.method.state_dict(),
            **self.rank_state(),
        }
        if self.meta_net is not None:
            state["meta_net"] = self.meta_net.state_dict()
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"trainer state must be a dict (from AAATrainer.state_dict), got {type(state).__name__}")
        missing = [k for k in ("config", "model", "optimizer", "fairness", "class_loss_avg", "epoch_loss_sum",
                               "epoch_loss_count", "iteration", "skipped_steps", "scaler", "generator", "torch_rng")
                   if k not in state]
        if missing:
            raise ValueError(f"trainer state has no {', '.join(missing)}; nothing was loaded")
        c = self.config.num_classes
        for key in ("class_loss_avg", "epoch_loss_sum", "epoch_loss_count"):
            if not isinstance(state[key], Tensor) or tuple(state[key].shape) != (c,):
                raise ValueError(f"trainer state's {key} must have shape ({c},), got "
                                 f"{tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__}"
                                 "; nothing was loaded")
        if state.get("format") != 1:
            raise ValueError(f"unsupported trainer state format {state.get('format')!r}, expected 1")
        saved = state["config"]
        for key in ("method", "num_classes", "bound_mode"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(f"trainer state was saved with {key}={saved.get(key)!r}, "
                                 f"this trainer has {key}={getattr(self.config, key)!r}")
        # everything checked before anything changes: a refused state leaves the trainer as it was
        check_module_state("model", self.model, state.get("model"))
        method_state = state.get("method_state", {})  # states saved before methods kept any have none
        check_optimizer_state("optimizer", self.optimizer, state.get("optimizer"))
        FairnessMultipliers(self.config.num_classes).load_state_dict(state["fairness"])  # refuses a bad one here
        if self.meta_net is not None:
            check_module_state("meta_net", self.meta_net, state.get("meta_net"))
            check_optimizer_state("meta_optimizer", self.meta_optimizer, state.get("meta_optimizer"))
        self.method.load_state_dict(method_state)  # a method refuses a state it cannot take here
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._device_skip = self._prepare_device_skip(self.optimizer)  # the saved groups' "fused" wins
        if self.meta_net is not None:
            self.meta_net.load_state_dict(state["meta_net"])
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.fairness.load_state_dict(state["fairness"])
        self._refresh_fairness_tensors()
        self.class_loss_avg = state["class_loss_avg"].to(self.device, torch.float32)
        self.iteration = int(state["iteration"])
        self._skipped_total.fill_(int(state["skipped_steps"]))
        self.scaler.load_state_dict(state["scaler"])
        self.load_rank_state(state)

    def rank_state(self) -> dict:
        """The part of state_dict that is this process's own under torchrun: the loss sums of its
        rows in the current epoch and its random streams. A checkpoint of a torchrun run keeps one
        per rank (aaa_fast.run), so that every rank resumes where it stopped."""
        state = {"epoch_loss_sum": self._epoch_loss_sum.cpu(), "epoch_loss_count": self._epoch_loss_count.cpu(),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_rank_state(self, state: dict) -> None:
        self._epoch_loss_sum = state["epoch_loss_sum"].to(self.device, torch.float64)
        self._epoch_loss_count = state["epoch_loss_count"].to(self.device, torch.float64)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

