"""What a training method is: the Method base class, the registry every layer reads, and the
records a method's step passes to the engine (aaa_fast.trainer.AAATrainer).

A method is one file in this package (timm's @register_model shape):

    @register_method
    class MART(Method):
        name = "mart"
        description = "MART: boosted CE on PGD-CE examples + lam * KL weighted by 1 - p_y"
        terms = ("boosted_ce", "weighted_kl")          # its loss terms: CSV/TensorBoard columns
        def prepare(self, batch): ...                   # the rows to forward (one train-mode forward)
        def loss(self, batch, logits, plan): ...        # StepLoss from their logits

The engine does the rest of the step for every method alike: input checks (on the device after
the first batch), the one train-mode forward of the concatenated rows, backward, the skip of a
non-finite step on the device, gradient synchronisation, the optimizer step, statistics and
state. A method never synchronises with the host in `prepare`/`loss`/hooks (the contract tests
count it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..objective import weighted_objective

ROLES = ("aaa", "baseline", "control", "reference")

# the shared settings a method may give its own default (AAAConfig fields left at None)
DEFAULTS = dict(eps=8 / 255, lam=6.0, bound_mode="fixed", fairness=False)
# per-step statistics the engine adds to a method's loss terms: the anti-adversarial share (rows
# with b > a), the share of rows inside the gradient band, the mean bound and the share of the
# method's attack rows that were attacked (below 1 where min_row_weight skipped rows)
ROW_STATS = ("frac_anti", "grad_band", "mean_eps", "rows_attacked")

_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class Batch:
    """One step's training batch as the engine hands it to the method."""
    x: Tensor                    # (N, ...) float in [0, 1], on the trainer's device (validated)
    y: Tensor                    # (N,) int64 labels
    eps: Tensor                  # (N,) the rows' bounds eps_0 * m_y (class remargins in 'remargin' mode)
    u: Tensor | None             # (C,) FRL class weights of the natural and boundary terms (None: fairness off)
    v: Tensor | None
    x_meta: Tensor | None = None  # the meta batch as given (validate with trainer.inputs), or None
    y_meta: Tensor | None = None
    corrupted: Tensor | None = None  # (N,) bool: which labels are wrong, where the method needs it


@dataclass
class Plan:
    """What a method's `prepare` decided for the batch: the rows the engine forwards in one
    train-mode pass (their logits come back to `loss` in the same order), and each row's weight
    on the adversarial (a) and anti-adversarial (b) side, for the statistics (anti share,
    gradient band) and the diagnostics of what was chosen."""
    rows: list[Tensor]
    a: Tensor | float = 1.0
    b: Tensor | float = 0.0
    eps: Tensor | None = None       # the bounds used, when not the batch's
    meta_grad_norm: Tensor | None = None  # set by a step that updated a meta-network
    # the rows rows[1] / rows[2] were built from (None: every row; see AAAConfig.min_row_weight)
    adv_rows: Tensor | None = None
    anti_rows: Tensor | None = None
    rows_attacked: float = 1.0      # share of the method's attack rows that were attacked
    measure_dropped: bool = False   # every row attacked although min_row_weight skips rows: loss()
                                    # measures the share of the objective that skipping drops


@dataclass
class StepLoss:
    """A method's loss for the step: the total the engine back-propagates, the method's named
    terms (Method.terms, in that order; logged per step and per epoch) and the unweighted clean
    cross-entropy per row, detached (the per-class loss statistics of the meta-network's features)."""
    total: Tensor
    terms: dict[str, Tensor]
    per_sample_ce: Tensor
    # on a step that attacked every row although min_row_weight skips rows: the share of the
    # objective that skipping would have dropped (measured, not bounded), else None
    dropped_share: Tensor | None = None


class Method:
    """A training method. Class attributes describe it to the CLI, the run and the report; an
    instance is made by the trainer (`Method(trainer)`) and holds whatever state it keeps."""
    name: ClassVar[str]
    description: ClassVar[str]          # one line for --help and the README's table
    role: ClassVar[str] = "baseline"    # aaa | baseline | control | reference (study reports)
    terms: ClassVar[tuple[str, ...]] = ("natural", "boundary", "anti")
    defaults: ClassVar[dict] = {}       # its own defaults of the shared settings (DEFAULTS' keys)
    uses_meta_net: ClassVar[bool] = False   # needs meta_net and meta_optimizer (and learns from the meta set)
    learns_bounds: ClassVar[bool] = False   # can take bound_mode='meta' (bounds from the meta-network)
    needs_corrupted: ClassVar[bool] = False  # step(..., corrupted=) must say which labels are wrong
    chooses_rows: ClassVar[bool] = False    # sets per-row (a, b): the run reports its anti share

    def __init__(self, trainer):  # an aaa_fast.trainer.AAATrainer (which imports this module)
        self.trainer = trainer

    # ---------------------------------------------------------------- settings
    @classmethod
    def default(cls, key: str):
        return cls.defaults.get(key, DEFAULTS[key])

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse settings this method cannot use (ValueError naming the setting)."""

    @classmethod
    def check_trainer(cls, optimizer, meta_net, meta_optimizer, config) -> None:
        """Refuse a trainer set up without what this method needs (before anything is built)."""

    # ---------------------------------------------------------------- the step
    def prepare(self, batch: Batch) -> Plan:
        raise NotImplementedError

    def loss(self, batch: Batch, logits: list[Tensor], plan: Plan) -> StepLoss:
        raise NotImplementedError

    # ---------------------------------------------------------------- optional hooks
    def after_optimizer_step(self, batch: Batch, plan: Plan) -> None:
        """Called after each applied or device-skipped optimizer step."""

    def end_epoch(self) -> None:
        """Called when the trainer closes an epoch (AAATrainer.end_epoch)."""

    def state_dict(self) -> dict:
        """Extra state the method keeps across steps (saved in the trainer's state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, but the trainer state has {sorted(state)}")


class WeightedObjectiveMethod(Method):
    """A method whose loss is the weighted objective (aaa_fast.objective.weighted_objective) of
    its rows: [natural] (ERM), [adversarial] (PGD-AT: the natural term on adversarial logits),
    [natural, adversarial] (TRADES, FRL), [natural, adversarial, anti-adversarial] (AAA)."""
    #: weight of the KL term in place of a_i (None: a_i; 1.0: every row keeps it, the kl-all objective)
    a_boundary: float | None = None

    def loss(self, batch: Batch, logits: list[Tensor], plan: Plan) -> StepLoss:
        t = weighted_objective(batch.y, logits[0], a=plan.a, u=batch.u,
                               adv_logits=logits[1] if len(logits) > 1 else None, v=batch.v,
                               lam=self.trainer.config.lam, anti_logits=logits[2] if len(logits) > 2 else None,
                               b=plan.b, a_boundary=self.a_boundary, adv_index=plan.adv_rows,
                               anti_index=plan.anti_rows)
        return StepLoss(t.total, {"natural": t.natural, "boundary": t.boundary, "anti": t.anti}, t.per_sample_ce)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute name (a non-empty string)")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    if cls.role not in ROLES:
        raise ValueError(f"{cls.__name__}.role must be one of {ROLES}, got {cls.role!r}")
    unknown = set(cls.defaults) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{cls.__name__}.defaults has no shared setting {sorted(unknown)}; they are {sorted(DEFAULTS)}")
    for term in cls.terms:
        if not term.isidentifier() or term in ("loss", *ROW_STATS):
            raise ValueError(f"{cls.__name__}.terms: {term!r} is not a usable term name")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {method_names()}, got {name!r}") from None


def step_stat_names(method: str) -> tuple[str, ...]:
    """StepStats keys and read_stats means of a method: the total loss, its terms, ROW_STATS."""
    return ("loss", *get_method(method).terms, *ROW_STATS)


def method_names(having: str | None = None) -> tuple[str, ...]:
    """Every registered method, in registration order (the CLI's --method choices); with
    `having`, those whose class attribute of that name is true (e.g. "chooses_rows")."""
    return tuple(name for name, cls in _REGISTRY.items() if having is None or getattr(cls, having))


def defaults_help(key: str) -> str:
    """'8/255 for erm, trades, ...; 10/255 for aaa, ...': a shared setting's default per method."""
    def show(v):
        return f"{round(v * 255)}/255" if key == "eps" else str(v)
    by_value: dict = {}
    for name, cls in _REGISTRY.items():
        by_value.setdefault(cls.default(key), []).append(name)
    return "; ".join(f"{show(v)} for {', '.join(names)}" for v, names in by_value.items())

