"""Routing metrics: the routing record, pure functions from summed records to scalars, and the per-step tracker.

Each MoE layer hands over, per training micro-batch, a `RoutingRecord` of *sums* over its tokens (assignment
counts, summed router probabilities, summed token entropies, ...). Sums compose: adding them over micro-batches and
all-reducing them over ranks gives exactly the numbers of the single-process run on the global batch, and every
metric below is a ratio of such sums, computed once per optimizer step.

Shape suffixes: L MoE layers, E experts. The functions reduce over the last dimension, so the same code
serves one layer ([E] -> []) and all layers at once ([L, E] -> [L]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moe_lm.routers.base import Diagnostics
from moe_lm.routers.functional import entropy


@dataclass
class RoutingRecord:
    """Sums over the tokens of one MoE layer's forward: one micro-batch on one rank, built by the MoE layer
    (`moe_lm.moe.routing_record`), or any number of them added up. p_t is token t's routing distribution over the
    E experts and S_t the set of experts it is sent to.

    `a + b` adds two records of one layer, `stack` sets layers side by side (every sum gets a leading [L]), and
    `all_reduced` sums a record over ranks in one collective. The losses and stats are averaged, not summed, over
    the forwards: their sums divided by `num_records`.
    """

    counts_E: Tensor  # assignments per expert before capacity drops
    kept_counts_E: Tensor  # assignments per expert after capacity drops
    probs_sum_E: Tensor  # Σ_t p_t
    entropy_sum: Tensor  # Σ_t H(p_t)
    topk_mass_sum: Tensor  # Σ_t Σ_{e∈S_t} p_t,e
    active_sum: Tensor  # Σ_t |S_t|
    num_tokens: Tensor  # T
    num_records: Tensor  # forwards summed here (1 for one forward)
    losses: dict[str, Tensor] = field(default_factory=dict)  # the router's unscaled aux losses, summed
    stats: dict[str, Tensor] = field(default_factory=dict)  # the router's stats, summed

    def _sums(self) -> list[Tensor]:
        """Every summed tensor, in a fixed order: the tensor fields, then the losses and the stats by name."""
        return ([getattr(self, f.name) for f in _SUM_FIELDS] + [self.losses[name] for name in sorted(self.losses)]
                + [self.stats[name] for name in sorted(self.stats)])

    def _with_sums(self, sums: Sequence[Tensor]) -> RoutingRecord:
        """A record with this one's loss and stat names and `sums` in `_sums` order."""
        fields, rest = sums[:len(_SUM_FIELDS)], sums[len(_SUM_FIELDS):]
        losses, stats = sorted(self.losses), sorted(self.stats)
        return RoutingRecord(**{f.name: t for f, t in zip(_SUM_FIELDS, fields)},
                             losses=dict(zip(losses, rest[:len(losses)])), stats=dict(zip(stats, rest[len(losses):])))

    def _through_flat(self, fn: Callable[[Tensor], Tensor]) -> RoutingRecord:
        """`fn` applied to every sum at once, as one flat tensor: one copy or one collective per record."""
        sums = self._sums()
        flat = fn(torch.cat([t.reshape(-1) for t in sums]))
        return self._with_sums([part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in sums]), sums)])

    def __add__(self, other: RoutingRecord) -> RoutingRecord:
        if self.losses.keys() != other.losses.keys() or self.stats.keys() != other.stats.keys():
            raise ValueError(f"records of one layer report different losses or stats: {sorted(self.losses)} "
                             f"{sorted(self.stats)} vs {sorted(other.losses)} {sorted(other.stats)}")
        return self._with_sums([a + b for a, b in zip(self._sums(), other._sums())])

    def to(self, *args, **kwargs) -> RoutingRecord:
        """Detached, with every sum moved or cast as `Tensor.to(*args, **kwargs)` does."""
        return self._through_flat(lambda flat: flat.detach().to(*args, **kwargs))

    def all_reduced(self, group: dist.ProcessGroup | None = None) -> RoutingRecord:
        """Summed over the ranks of `group` (None = world): one all-reduce, on the device, no host read. Every rank
        must hold a record of the same shapes and loss and stat names."""
        def all_reduce(flat: Tensor) -> Tensor:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            return flat

        return self._through_flat(all_reduce)

    @staticmethod
    def stack(records: Sequence[RoutingRecord | None]) -> RoutingRecord:
        """The records of L layers side by side ([L, E] and [L] sums). A layer that recorded nothing (None) is
        zeros; a loss or stat that a layer does not report is NaN there, so that its mean leaves the layer out."""
        present = [r for r in records if r is not None]
        nan = present[0].num_tokens.new_full((), math.nan)

        def stacked(per_layer: list[Tensor | None], missing: Tensor) -> Tensor:
            return torch.stack([missing if t is None else t for t in per_layer])

        sums = {f.name: stacked([None if r is None else getattr(r, f.name) for r in records],
                                torch.zeros_like(getattr(present[0], f.name))) for f in _SUM_FIELDS}
        losses = {name: stacked([None if r is None else r.losses.get(name) for r in records], nan)
                  for name in sorted({name for r in present for name in r.losses})}
        stats = {name: stacked([None if r is None else r.stats.get(name) for r in records], nan)
                 for name in sorted({name for r in present for name in r.stats})}
        return RoutingRecord(**sums, losses=losses, stats=stats)


_SUM_FIELDS = tuple(f for f in dataclasses.fields(RoutingRecord) if f.name not in ("losses", "stats"))
"""The tensor fields of a routing record, in declaration order."""


def load_shares(counts_E: Tensor) -> Tensor:
    """Token share of each expert, f_e = c_e / Σ_e' c_e' (all zeros when nothing was routed)."""
    return counts_E / counts_E.sum(-1, keepdim=True).clamp_min(torch.finfo(counts_E.dtype).tiny)


def load_cv(counts_E: Tensor) -> Tensor:
    """Coefficient of variation of the load, CV = std_e(c) / mean_e(c) with the population std.

    0 for a perfectly balanced layer, sqrt(E - 1) when one expert takes everything.
    """
    mean = counts_E.mean(-1)
    return counts_E.std(-1, correction=0) / mean.clamp_min(torch.finfo(counts_E.dtype).tiny)


def max_over_mean(counts_E: Tensor) -> Tensor:
    """Busiest expert's load over the mean load, max_e(c) / mean_e(c): the capacity factor dropless
    routing would need; 1 when balanced, E when collapsed."""
    return counts_E.amax(-1) / counts_E.mean(-1).clamp_min(torch.finfo(counts_E.dtype).tiny)


def drop_fraction(counts_E: Tensor, kept_counts_E: Tensor) -> Tensor:
    """Share of assignments dropped by expert capacity, 1 − Σ_e kept_e / Σ_e c_e."""
    return 1 - kept_counts_E.sum(-1) / counts_E.sum(-1).clamp_min(torch.finfo(counts_E.dtype).tiny)


def dead_mask(counts_E: Tensor, dead_expert_share: float) -> Tensor:
    """Experts whose share is below `dead_expert_share` of the uniform share: f_e < dead_expert_share / E."""
    return load_shares(counts_E) < dead_expert_share / counts_E.shape[-1]


def dead_experts(counts_E: Tensor, dead_expert_share: float) -> Tensor:
    """Number of dead experts, #{e : f_e < dead_expert_share / E}."""
    return dead_mask(counts_E, dead_expert_share).sum(-1).to(counts_E.dtype)


def collapse_rate(counts_LE: Tensor, dead_expert_share: float) -> Tensor:
    """Share of (layer, expert) units that are dead, Σ_l #dead_l / (L · E): 0 healthy, 1 − 1/E fully collapsed."""
    return dead_mask(counts_LE, dead_expert_share).to(counts_LE.dtype).mean()


def per_token_mean(total: Tensor, num_tokens: Tensor) -> Tensor:
    """Mean over tokens of a per-token quantity from its sum, total / T. Used for:

    token routing entropy  mean_t H(p_t)          = entropy_sum / T
    expected top-k mass    mean_t Σ_{e∈S_t} p_t,e = topk_mass_sum / T
    mean active experts    mean_t |S_t|           = active_sum / T
    """
    return total / num_tokens.clamp_min(1)


def mean_dist_entropy(probs_sum_E: Tensor, num_tokens: Tensor) -> Tensor:
    """Entropy of the mean routing distribution, H(p̄) with p̄ = probs_sum / T.

    High H(p̄) with low token entropy is the healthy regime: confident tokens, experts used evenly.
    """
    return entropy(probs_sum_E / num_tokens.clamp_min(1).unsqueeze(-1))


def effective_experts(entropy_nats: Tensor) -> Tensor:
    """exp(H): the number of equally used experts that would give this entropy (E when uniform, 1 collapsed)."""
    return entropy_nats.exp()


def _spread(values_L: Tensor) -> dict[str, Tensor]:
    """Mean, max and the 50th / 90th percentiles (linear interpolation) over layers."""
    return {"mean": values_L.mean(), "max": values_L.amax(),
            "p50": values_L.quantile(0.5), "p90": values_L.quantile(0.9)}


class RoutingTracker:
    """Sums routing records over the micro-batches of a step, all-reduces them once, and turns them into metrics.

    `record` only adds on the record's device (no host sync); `reduce` does one all-reduce of one flat
    float64 tensor (float32 sums lose exactness past 2^24 assignments), and `compute` reads it back. Every rank
    must record the same layers and the same loss/stat names between two computes, as lockstep data-parallel
    training does.
    """

    def __init__(self, num_moe_layers: int, num_experts: int, dead_expert_share: float = 0.1,
                 per_layer: bool = False):
        self.num_moe_layers, self.num_experts = num_moe_layers, num_experts
        self.dead_expert_share, self.per_layer = dead_expert_share, per_layer
        self._records: list[RoutingRecord | None] = [None] * num_moe_layers  # per layer, summed over micro-batches
        self._reduced: RoutingRecord | None = None  # all layers stacked, summed over ranks
        self._last_shares: list[list[float]] | None = None
        self._last_counts_LE: Tensor | None = None

    def record(self, layer: int, record: RoutingRecord) -> None:
        """Add one micro-batch's routing record of MoE layer `layer` (0-based among MoE layers)."""
        if not 0 <= layer < self.num_moe_layers:
            raise IndexError(f"MoE layer {layer} out of range [0, {self.num_moe_layers})")
        if record.counts_E.shape != (self.num_experts,):
            raise ValueError(f"counts_E of MoE layer {layer} has shape {tuple(record.counts_E.shape)}, "
                             f"expected ({self.num_experts},)")
        record = record.to(torch.float64)
        total = self._records[layer]
        self._records[layer] = record if total is None else total + record

    def reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum what was recorded since the last reset over the ranks of `group` (None = world): one all-reduce,
        on the device, no host read. `layer_counts` and `compute` then see the global sums."""
        if all(r is None for r in self._records):
            self._reduced = None
            return
        self._reduced = RoutingRecord.stack(self._records).all_reduced(group)
        self._last_counts_LE = self._reduced.counts_E

    def reset(self) -> None:
        """Forget what was recorded (and reduced) so far."""
        self._records, self._reduced = [None] * self.num_moe_layers, None

    def compute(self, reset: bool = True, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics of everything recorded since the last reset, summed over the ranks of `group` (None = world;
        reduced here unless `reduce` already was).

        Summary keys (moe/load_cv_{mean,max,p50,p90}, moe/drop_frac, ...) and, with `per_layer`,
        moe/layer{i}/... keys: see docs/metrics.md. Returns {} when nothing was recorded (a dense model);
        layers that recorded nothing are left out.
        """
        if self._reduced is None:
            self.reduce(group)
        if self._reduced is None:
            return {}
        sums = self._reduced.to("cpu")
        if reset:
            self.reset()

        shares_LE = load_shares(sums.counts_E)
        self._last_shares = shares_LE.tolist()
        seen = sums.num_tokens > 0
        if not seen.any():
            return {}
        layers = seen.nonzero().flatten().tolist()
        counts_LE, kept_LE, shares_LE = sums.counts_E[seen], sums.kept_counts_E[seen], shares_LE[seen]
        tokens_L = sums.num_tokens[seen]
        mean_dist_entropy_L = mean_dist_entropy(sums.probs_sum_E[seen], tokens_L)
        per_layer_L = {
            "load_cv": load_cv(counts_LE),
            "max_over_mean": max_over_mean(counts_LE),
            "drop_frac": drop_fraction(counts_LE, kept_LE),
            "dead_experts": dead_experts(counts_LE, self.dead_expert_share),
            "token_entropy": per_token_mean(sums.entropy_sum[seen], tokens_L),
            "mean_dist_entropy": mean_dist_entropy_L,
            "effective_experts": effective_experts(mean_dist_entropy_L),
            "topk_mass": per_token_mean(sums.topk_mass_sum[seen], tokens_L),
            "active_experts": per_token_mean(sums.active_sum[seen], tokens_L),
        }
        for kind, named_sums in (("loss", sums.losses), ("stat", sums.stats)):
            for name, sum_L in named_sums.items():
                per_layer_L[f"{kind}/{name}"] = (sum_L / sums.num_records)[seen]  # NaN where a layer never reported it

        out: dict[str, Tensor | float] = {}
        for name, values_L in per_layer_L.items():
            if name in ("load_cv", "max_over_mean"):
                out.update({f"moe/{name}_{stat}": v for stat, v in _spread(values_L).items()})
            elif name == "dead_experts":
                out["moe/dead_experts"] = values_L.sum()
            elif name == "drop_frac":  # pooled over layers: the share of all assignments that were dropped
                out["moe/drop_frac"] = drop_fraction(counts_LE.flatten(), kept_LE.flatten())
            else:
                out[f"moe/{name}"] = values_L.nanmean()
        out["moe/collapse_rate"] = collapse_rate(counts_LE, self.dead_expert_share)
        if self.per_layer:
            columns = {name: values_L.tolist() for name, values_L in per_layer_L.items()}
            for row, layer in enumerate(layers):
                out.update({f"moe/layer{layer}/{name}": values[row] for name, values in columns.items()
                            if not math.isnan(values[row])})
                out.update({f"moe/layer{layer}/share/e{e}": share for e, share in enumerate(shares_LE[row].tolist())})
        return {k: float(v) for k, v in out.items()}

    def layer_counts(self, layer: int) -> Tensor:
        """Assignment counts c_e [E] of MoE layer `layer` in the last computed step, summed over the group's ranks,
        on the records' device, float64: what routers with per-step state (an expert-bias update) need, at no
        extra all-reduce."""
        if self._last_counts_LE is None:
            raise RuntimeError("layer_counts() before the first compute()")
        return self._last_counts_LE[layer]

    def last_load_shares(self) -> list[list[float]] | None:
        """The [L][E] load shares f_e of the last computed step (the expert-load heatmap), None before any."""
        return self._last_shares


def diagnostics_metrics(layers: Sequence[Diagnostics], per_layer: bool) -> dict[str, float]:
    """The routers' `Diagnostics` of every MoE layer as `router/...` metrics: each scalar and each per-expert mean
    averaged over the layers; with `per_layer`, also every layer's values (every expert's included) under
    `router/layer{i}/...`."""
    summaries = [d.summary() for d in layers]
    out = {f"router/{key}": sum(s[key] for s in summaries) / len(summaries) for key in summaries[0]} if layers else {}
    if per_layer:
        for i, (diagnostics, summary) in enumerate(zip(layers, summaries)):
            values = summary | diagnostics.expert_values()
            out.update({f"router/layer{i}/{key}": value for key, value in values.items()})
    return out
