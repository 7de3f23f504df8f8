"""Routing metrics: pure functions from summed routing records to scalars, and the per-step tracker.

Each MoE layer hands over, per training micro-batch, *sums* over its tokens (assignment counts, summed
router probabilities, summed token entropies, ...). Sums compose: adding them over micro-batches and
all-reducing them over ranks gives exactly the numbers of the single-process run on the global batch, and
every metric below is a ratio of such sums, computed once per optimizer step.

Shape suffixes: L MoE layers, E experts. The functions reduce over the last dimension, so the same code
serves one layer ([E] -> []) and all layers at once ([L, E] -> [L]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

VECTOR_KEYS = ("counts_E", "kept_counts_E", "probs_sum_E")
"""[E] sums of a routing record: assignments before and after capacity drops, router probabilities."""
SUM_KEYS = ("entropy_sum", "topk_mass_sum", "active_sum", "num_tokens")
"""Scalar sums of a routing record: Σ_t H(p_t), Σ_t Σ_{e∈S_t} p_t,e, Σ_t |S_t|, T."""
AVERAGED_PREFIXES = ("loss/", "stat/")
"""Record keys averaged (not summed) over micro-batches and ranks."""


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


def entropy(p_E: Tensor) -> Tensor:
    """Shannon entropy in nats, H(p) = −Σ_e p_e log p_e with 0 log 0 = 0; log E for the uniform distribution."""
    return torch.special.entr(p_E).sum(-1)


def mean_dist_entropy(probs_sum_E: Tensor, num_tokens: Tensor) -> Tensor:
    """Entropy of the mean routing distribution, H(p̄) with p̄ = probs_sum / T.

    High H(p̄) with low token entropy is the healthy regime: confident tokens, experts used evenly.
    """
    return entropy(probs_sum_E / num_tokens.clamp_min(1).unsqueeze(-1))


def effective_experts(entropy_nats: Tensor) -> Tensor:
    """exp(H): the number of equally used experts that would give this entropy (E when uniform, 1 collapsed)."""
    return entropy_nats.exp()


def _float64(x: Tensor | float, device: torch.device) -> Tensor:
    return torch.as_tensor(x).detach().to(device=device, dtype=torch.float64)


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
        self._sums_LS: Tensor | None = None  # per layer: counts E | kept E | probs_sum E | SUM_KEYS
        self._averaged: dict[str, Tensor] = {}  # name -> [2, L]: sum of values, number of values
        self._reduced: tuple[list[str], Tensor] | None = None  # (averaged names, all-reduced flat sums)
        self._last_shares: list[list[float]] | None = None
        self._last_counts_LE: Tensor | None = None

    def record(self, layer: int, record: Mapping[str, Tensor | float]) -> None:
        """Add one micro-batch's routing record of MoE layer `layer` (0-based among MoE layers)."""
        if not 0 <= layer < self.num_moe_layers:
            raise IndexError(f"MoE layer {layer} out of range [0, {self.num_moe_layers})")
        device = record["counts_E"].device
        vectors = [_float64(record[k], device) for k in VECTOR_KEYS]
        for key, v in zip(VECTOR_KEYS, vectors):
            if v.shape != (self.num_experts,):
                raise ValueError(f"{key} of MoE layer {layer} has shape {tuple(v.shape)}, "
                                 f"expected ({self.num_experts},)")
        row = torch.cat(vectors + [torch.stack([_float64(record[k], device).reshape(()) for k in SUM_KEYS])])
        if self._sums_LS is None:
            self._sums_LS = row.new_zeros(self.num_moe_layers, row.numel())
        self._sums_LS[layer] += row
        for name, value in record.items():
            if name.startswith(AVERAGED_PREFIXES):
                acc = self._averaged.get(name)
                if acc is None:
                    acc = self._averaged[name] = row.new_zeros(2, self.num_moe_layers)
                acc[0, layer] += _float64(value, device).reshape(())
                acc[1, layer] += 1

    def reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum what was recorded since the last reset over the ranks of `group` (None = world): one all-reduce,
        on the device, no host read. `layer_counts` and `compute` then see the global sums."""
        if self._sums_LS is None:
            self._reduced = None
            return
        names = sorted(self._averaged)
        flat = torch.cat([self._sums_LS.flatten()] + [self._averaged[n].flatten() for n in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self._reduced = (names, flat)
        n_sums = self.num_moe_layers * (3 * self.num_experts + len(SUM_KEYS))
        self._last_counts_LE = flat[:n_sums].view(self.num_moe_layers, -1)[:, :self.num_experts]

    def reset(self) -> None:
        """Forget what was recorded (and reduced) so far."""
        self._sums_LS, self._averaged, self._reduced = None, {}, None

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
        names, flat = self._reduced
        if reset:
            self.reset()

        L, E = self.num_moe_layers, self.num_experts
        n_sums = L * (3 * E + len(SUM_KEYS))
        flat = flat.cpu()
        sums_LS, averaged = flat[:n_sums].view(L, -1), flat[n_sums:]
        counts_LE, kept_LE, probs_LE = sums_LS[:, :E], sums_LS[:, E:2 * E], sums_LS[:, 2 * E:3 * E]
        entropy_L, topk_L, active_L, tokens_L = sums_LS[:, 3 * E:].unbind(-1)
        shares_LE = load_shares(counts_LE)
        self._last_shares = shares_LE.tolist()

        seen = tokens_L > 0
        if not seen.any():
            return {}
        layers = seen.nonzero().flatten().tolist()
        counts_LE, kept_LE, shares_LE, tokens_L = counts_LE[seen], kept_LE[seen], shares_LE[seen], tokens_L[seen]
        mean_dist_entropy_L = mean_dist_entropy(probs_LE[seen], tokens_L)
        per_layer_L = {
            "load_cv": load_cv(counts_LE),
            "max_over_mean": max_over_mean(counts_LE),
            "drop_frac": drop_fraction(counts_LE, kept_LE),
            "dead_experts": dead_experts(counts_LE, self.dead_expert_share),
            "token_entropy": per_token_mean(entropy_L[seen], tokens_L),
            "mean_dist_entropy": mean_dist_entropy_L,
            "effective_experts": effective_experts(mean_dist_entropy_L),
            "topk_mass": per_token_mean(topk_L[seen], tokens_L),
            "active_experts": per_token_mean(active_L[seen], tokens_L),
        }
        for i, name in enumerate(names):
            value_sum_L, value_count_L = averaged[2 * L * i:2 * L * (i + 1)].view(2, L)
            per_layer_L[name] = (value_sum_L / value_count_L)[seen]  # NaN where a layer never reported it

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
