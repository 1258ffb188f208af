"""AAA: adversaries and anti-adversaries (docs/METHOD.md). Every row is trained on its clean
image, its adversarial example (weight a_i, through the KL term) and its anti-adversarial
example (weight b_i, through a CE term), the pair built by one signed, bounded PGD over the 2N
rows. Who chooses (a_i, b_i):

    aaa         a meta-network on six per-sample statistics, updated every meta_every
                iterations by a lookahead on the clean, balanced meta set (its meta step lives here)
    aaa-fixed   the same (a, b) for every row (AAAConfig.fixed_weights; 1/2, 1/2 by default)
    aaa-oracle  the control: a = 0, b = 1 on the rows whose labels were corrupted, 1, 0 elsewhere
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..meta import meta_gradient
from ..objective import sample_features, weighted_objective
from ..ops import project
from .base import Batch, Plan, StepLoss, WeightedObjectiveMethod, register_method

# min_row_weight rounds the kept count up to a multiple of ceil(N / ROW_GROUPS): at most
# ROW_GROUPS + 1 batch shapes per side, so CUDA graphs capture a bounded number of attacks
ROW_GROUPS = 8


class AdversarialPair(WeightedObjectiveMethod):
    """The AAA objective on the pair; subclasses choose each row's (a, b)."""
    role = "aaa"
    defaults = dict(eps=10 / 255, lam=1.5, bound_mode="remargin", fairness=True)  # the paper's
    chooses_rows = True

    @property
    def a_boundary(self) -> float | None:
        return 1.0 if self.trainer.config.objective == "kl-all" else None

    def choose(self, batch: Batch) -> tuple[Tensor | float, Tensor | float]:
        raise NotImplementedError

    def prepare(self, batch: Batch) -> Plan:
        t, n = self.trainer, batch.x.shape[0]
        a, b = self.choose(batch)
        clean_logits = t.clean_logits(batch.x)
        if not self.full_step():
            return self.skipping_plan(batch, clean_logits, a, b, batch.eps)
        pair = t.pair(batch.x, batch.y, clean_logits, batch.eps)
        return Plan([batch.x, pair[:n], pair[n:]], a=a, b=b, measure_dropped=self.skips_rows)

    # ------------------------------------------------ attack only what has weight (min_row_weight)
    @property
    def skips_rows(self) -> bool:
        return self.trainer.config.min_row_weight > 0

    def full_step(self) -> bool:
        """Whether this step attacks every row: always without min_row_weight; with it, every
        meta_every-th iteration (AAA's meta steps), where loss() measures what skipping drops."""
        t = self.trainer
        return not self.skips_rows or t.iteration % t.config.meta_every == 0

    def weighted_rows(self, weight: Tensor | float, n: int) -> Tensor | None:
        """Indices of the rows whose weight reaches min_row_weight (None: every row), their count
        rounded up (see ROW_GROUPS) with the heaviest of the others, in row order. Reading the
        count is the step's one host synchronisation (none on a CPU)."""
        tau = self.trainer.config.min_row_weight
        if not isinstance(weight, Tensor):  # one weight for every row (aaa-fixed)
            return None if weight >= tau else torch.zeros(0, dtype=torch.long, device=self.trainer.device)
        group = -(-n // ROW_GROUPS)
        kept = -(-int((weight >= tau).sum()) // group) * group
        return None if kept >= n else weight.topk(kept).indices.sort().values

    def skipping_plan(self, batch: Batch, clean_logits: Tensor, a, b, eps: Tensor) -> Plan:
        """A plain step's rows under min_row_weight: anti-adversarial examples only for rows whose
        b_i counts and (paper objective; kl-all keeps every row's KL term) adversarial ones only
        for rows whose a_i counts."""
        n = batch.x.shape[0]
        adv = self.weighted_rows(a, n) if self.a_boundary is None else None
        anti = self.weighted_rows(b, n)
        pair = self.trainer.pair(batch.x, batch.y, clean_logits, eps, adv_rows=adv, anti_rows=anti)
        n_adv = n if adv is None else adv.shape[0]
        n_anti = n if anti is None else anti.shape[0]
        return Plan([batch.x, pair[:n_adv], pair[n_adv:]], a=a, b=b, eps=eps, adv_rows=adv, anti_rows=anti,
                    rows_attacked=(n_adv + n_anti) / (2 * n))

    def loss(self, batch: Batch, logits: list[Tensor], plan: Plan) -> StepLoss:
        out = super().loss(batch, logits, plan)
        if plan.measure_dropped:  # the terms of the rows skipping leaves out, from this full step
            cfg = self.trainer.config

            def below(w):  # the weights skipping leaves out (w: (N,) or one number for every row)
                return w * (w < cfg.min_row_weight)
            dropped = weighted_objective(batch.y, logits[0], a=0.0, u=batch.u, adv_logits=logits[1], v=batch.v,
                                         lam=cfg.lam, anti_logits=logits[2], b=below(plan.b),
                                         a_boundary=below(plan.a) if self.a_boundary is None else 0.0).total
            out.dropped_share = (dropped / out.total.abs().clamp_min(1e-12)).detach()
        return out


@register_method
class AAAFixed(AdversarialPair):
    name = "aaa-fixed"
    description = "AAA with the same (a, b) for every row (--fixed-weights; 1/2, 1/2)"

    def choose(self, batch: Batch):
        return self.trainer.config.fixed_weights


@register_method
class AAA(AdversarialPair):
    name = "aaa"
    description = "AAA: a meta-network learns each row's adversarial/anti-adversarial choice (and bound)"
    uses_meta_net = True
    learns_bounds = True

    @classmethod
    def check_trainer(cls, optimizer, meta_net, meta_optimizer, config) -> None:
        if meta_net is None or meta_optimizer is None:
            raise ValueError("method='aaa' needs meta_net and meta_optimizer")
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError("method='aaa' replicates the optimizer's step in its lookahead: use torch.optim.SGD")
        if meta_net.bound_head != (config.bound_mode == "meta"):
            raise ValueError(f"bound_mode={config.bound_mode!r} needs MetaNet(bound_head={config.bound_mode == 'meta'})")

    def prepare(self, batch: Batch) -> Plan:
        t, cfg = self.trainer, self.trainer.config
        x, y, n = batch.x, batch.y, batch.x.shape[0]
        clean_logits = t.clean_logits(x)
        features = sample_features(clean_logits, y, t.class_loss_avg, t.class_share)
        t.meta_net.train()
        with torch.no_grad():
            a, b, s = t.meta_net(features)
        meta_bounds = cfg.bound_mode == "meta"
        eps = cfg.eps * s if meta_bounds else batch.eps
        if not self.full_step():
            return self.skipping_plan(batch, clean_logits, a, b, eps)
        pair = t.pair(x, y, clean_logits, eps, keep_unprojected=meta_bounds)
        pair, unprojected = pair if meta_bounds else (pair, None)
        meta_grad_norm = None
        if batch.x_meta is not None and t.iteration % cfg.meta_every == 0:
            meta_grad_norm = self.meta_step(batch, features, pair, unprojected)
            with torch.no_grad():
                a, b, s = t.meta_net(features)
            if meta_bounds:  # the new bounds re-project the kept last iterates
                eps = cfg.eps * s
                pair = self.meta_bounded_pair(unprojected, x, s)
        return Plan([x, pair[:n], pair[n:]], a=a, b=b, eps=eps, meta_grad_norm=meta_grad_norm,
                    measure_dropped=self.skips_rows)

    def meta_bounded_pair(self, unprojected: Tensor, x: Tensor, s: Tensor) -> Tensor:
        """The pair's rows re-projected onto bounds eps_0 * s_i (differentiable in s)."""
        cfg = self.trainer.config
        return project(unprojected, torch.cat([x, x]), (cfg.eps * s).repeat(2), cfg.norm)

    def meta_step(self, batch: Batch, features: Tensor, pair: Tensor, unprojected: Tensor | None) -> Tensor:
        """docs/METHOD.md steps 2-3: virtual SGD step on L(W; Omega), meta loss on the meta batch
        (its own pair built against W, a = b = 1) plus the collapse guard, Adam step on Omega.
        Returns the meta-gradient's norm (a 0-d tensor)."""
        t, cfg = self.trainer, self.trainer.config
        x, y, u, v, n = batch.x, batch.y, batch.u, batch.v, batch.x.shape[0]
        x_meta, y_meta = t.inputs(batch.x_meta, batch.y_meta, "meta batch")
        meta_pair = t.pair(x_meta, y_meta, t.clean_logits(x_meta), t.row_bounds(y_meta))
        meta_rows = [x_meta, meta_pair[:x_meta.shape[0]], meta_pair[x_meta.shape[0]:]]
        # fp16 double-backward would need its own loss scaling: the lookahead runs in fp32 then
        amp_dtype = None if t.amp_dtype == torch.float16 else t.amp_dtype
        chosen = {}

        def train_loss(forward) -> Tensor:
            a, b, s = t.meta_net(features)
            chosen["b"] = b
            # meta bounds: gradient to them through the last projection
            both = pair if s is None else self.meta_bounded_pair(unprojected, x, s)
            logits = t.forward([x, both[:n], both[n:]], forward, amp_dtype)
            return weighted_objective(y, logits[0], a=a, u=u, adv_logits=logits[1], v=v, lam=cfg.lam,
                                      anti_logits=logits[2], b=b, a_boundary=self.a_boundary).total

        def meta_loss(forward) -> Tensor:
            logits = t.forward(meta_rows, forward, amp_dtype)
            loss = weighted_objective(y_meta, logits[0], a=1.0, u=u, adv_logits=logits[1], v=v, lam=cfg.lam,
                                      anti_logits=logits[2], b=1.0).total
            if cfg.anti_cap < 1:
                # the lookahead favours the easy anti term for every row; past the cap the
                # guard's gradient (O(1/T)) outweighs it and pushes the share back
                loss = loss + (chosen["b"].mean() - cfg.anti_cap).clamp_min(0)
            return loss

        t.model.train()
        t.meta_net.train()
        grads = meta_gradient(t.model, t.meta_net, t.optimizer, train_loss, meta_loss)
        if t.grad_sync is not None:
            t.grad_sync(grads)
        t.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip([p for p in t.meta_net.parameters() if p.requires_grad], grads):
            p.grad = g
        t.meta_optimizer.step()
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@register_method
class AAAOracle(AdversarialPair):
    name = "aaa-oracle"
    description = "control: the rows whose labels were corrupted to the anti term (needs label noise)"
    role = "control"
    needs_corrupted = True

    def choose(self, batch: Batch):
        corrupted, y = batch.corrupted, batch.y
        if not (isinstance(corrupted, Tensor) and corrupted.shape == y.shape and corrupted.dtype == torch.bool):
            raise ValueError(f"method='aaa-oracle' needs corrupted=, a bool tensor of shape {tuple(y.shape)} "
                             "saying which training labels are corrupted, got "
                             f"{corrupted.dtype if isinstance(corrupted, Tensor) else type(corrupted).__name__}"
                             f"{tuple(corrupted.shape) if isinstance(corrupted, Tensor) else ''}")
        b = corrupted.to(batch.x.device, non_blocking=True).float()
        return 1 - b, b
