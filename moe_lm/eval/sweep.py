"""`moe-lm eval RUN_DIR --sweep [--baseline RUN_DIR]`: post-hoc sparsity without retraining, measured honestly.

An arm is one checkpoint whose router has post-hoc knobs (`moe_lm.routers.base.PostHocSparsity`): grmoe's
concentration α in softmax(α·s), or softmax_topk's and mpi's inverse temperature α = 1/T in softmax(α·logits).
Every arm is evaluated at every (α, τ), τ the mass threshold of evaluation dispatch: each token gets the smallest
set of most probable experts holding mass >= τ, at most k_max; τ = 0 is plain top-k. A grmoe run with a
softmax_topk `baseline` puts GrMoE's α curve and the baseline's temperature curve in one table and one plot.

What keeps the numbers honest:
- capacity: the checkpoint's training capacity factor (`model.moe.capacity_factor`, over micro-batches of
  `train.micro_batch_size` sequences, so every expert has its training buffer, sized for top_k whatever k_max is),
  or none with `dropless`; every row reports the share of assignments the capacity dropped;
- reference rows: τ = 0 (top-k dispatch) and the trained α (1 unless grmoe's `model.moe.router.alpha` says
  otherwise) are always swept;
- k_max defaults to E, so threshold dispatch can give a token more experts than top_k as well as fewer;
- compute is counted, not timed: the one-process expert kernels also run the dropped and unused slots (weight 0),
  so tokens/s does not move with sparsity. A kernel that skips them does, per token,
      expert_flops_per_token = 2 · 3 · d_model · d_expert · kept_experts · n_moe_layers
  (a SwiGLU expert is three d_model × d_expert matmuls, 2 FLOPs per multiply-add; forward only), where
  kept_experts = active_experts · (1 − drop_frac) is the mean number of experts that process a token in one MoE
  layer (every layer sees every token), and flops_vs_topk = kept_experts / top_k is that as a share of the expert
  FLOPs of dropless top-k dispatch.

Writes `OUT/sweep.csv`, `OUT/sweep.json` (the setup and the rows) and the plot `OUT/ppl_vs_active_experts.png`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from moe_lm.checkpoint import load_model, run_dir_of
from moe_lm.eval.evaluate import evaluate_setting, make_dropless, make_training_capacity, validation_data
from moe_lm.model.transformer import MoETransformer
from moe_lm.routers import REGISTRY
from moe_lm.routers.base import PostHocSparsity

SWEEP_COLUMNS = ("arm", "router", "alpha", "tau", "max_experts", "capacity_factor", "val_loss", "val_ppl",
                 "drop_frac", "active_experts", "kept_experts", "expert_flops_per_token", "flops_vs_topk",
                 "token_entropy", "topk_mass")
"""sweep.csv: arm (the run folder), router, alpha (α; 1/T for the softmax routers), tau (τ), max_experts (k_max;
unused at τ = 0), capacity_factor (empty when dropless), val_loss, val_ppl, drop_frac (share of assignments dropped
by capacity), active_experts (dispatched per token and MoE layer), kept_experts (computed per token and MoE layer,
after drops), expert_flops_per_token, flops_vs_topk, token_entropy, topk_mass (probability of the dispatched
experts)."""


@dataclass
class Arm:
    """One checkpoint ready to sweep: knobs at hand, capacity set, routing records on."""

    name: str
    model: MoETransformer
    cfg: object
    routers: list[PostHocSparsity]
    max_experts: int
    trained_alpha: float
    capacity_factor: float | None  # None: dropless


def post_hoc_routers(model: MoETransformer, router_name: str) -> list[PostHocSparsity]:
    """The routers of `model`'s MoE layers; a ValueError naming the routers that have knobs if they lack them."""
    routers = [layer.router for layer in model.moe_layers()]
    if not routers or not all(isinstance(r, PostHocSparsity) for r in routers):
        swept = sorted(name for name, (_, cls) in REGISTRY.items() if issubclass(cls, PostHocSparsity))
        raise ValueError(f"router {router_name!r} has no post-hoc knobs (alpha and a mass-threshold dispatch); "
                         f"the sweep takes {', '.join(swept)}")
    return routers


def load_arm(checkpoint: str | Path, max_experts: int | None, dropless: bool) -> Arm:
    """`checkpoint` at training capacity (or dropless), k_max = `max_experts` (None: E) checked against its E."""
    model, cfg = load_model(checkpoint)
    moe = cfg.model.moe
    routers = post_hoc_routers(model, moe.router.name)
    k_max = moe.num_experts if max_experts is None else max_experts
    for router in routers:
        router.set_eval_threshold(0.0, k_max)  # raises on k_max outside [1, E] before anything is evaluated
    (make_dropless if dropless else make_training_capacity)(model)
    for layer in model.moe_layers():
        layer.gate.record_always = True
    capacity_factor = moe.capacity_factor if moe.drop_tokens and not dropless else None
    return Arm(str(run_dir_of(checkpoint)), model, cfg, routers, k_max, routers[0].alpha, capacity_factor)


def sweep(checkpoint: str | Path, alphas: list[float], taus: list[float], max_experts: int | None = None,
          num_samples: int = 256, out_dir: str | Path = "sweep", data_dir: str | Path | None = None,
          dropless: bool = False, baseline: str | Path | None = None) -> list[dict]:
    """Rows of SWEEP_COLUMNS for `checkpoint` and, if given, the `baseline` checkpoint, each over
    ({trained α} ∪ alphas) × ({0} ∪ taus), on the first `num_samples` sequences of the validation split of
    `data_dir` (default: `checkpoint`'s data.dir); written to `out_dir` and returned."""
    arms = [load_arm(source, max_experts, dropless) for source in (checkpoint, baseline) if source is not None]
    data_dir = Path(data_dir or arms[0].cfg.data.dir)
    rows = [row for arm in arms for row in sweep_arm(arm, alphas, taus, data_dir, num_samples)]
    setup = {"arms": [arm.name for arm in arms], "data": str(data_dir / "val"), "samples": num_samples,
             "dropless": dropless}
    write_sweep(rows, setup, Path(out_dir))
    return rows


def sweep_arm(arm: Arm, alphas: list[float], taus: list[float], data_dir: Path, num_samples: int) -> list[dict]:
    cfg, moe = arm.cfg, arm.cfg.model.moe
    data = validation_data(data_dir, cfg.model.seq_len)
    flops_per_kept_expert = 2 * 3 * cfg.model.d_model * moe.expert_width(cfg.model.d_ff) * len(arm.model.moe_layers())
    rows = []
    for tau in sorted({0.0, *taus}):
        for alpha in sorted({arm.trained_alpha, *alphas}):
            for router in arm.routers:
                router.set_alpha(alpha)
                router.set_eval_threshold(tau)
            result = evaluate_setting(arm.model, data, min(num_samples, len(data)), cfg.train.micro_batch_size)
            kept = result["active_experts"] * (1 - result["drop_frac"])
            row = {"arm": arm.name, "router": moe.router.name, "alpha": alpha, "tau": tau,
                   "max_experts": arm.max_experts, "capacity_factor": arm.capacity_factor, **result,
                   "kept_experts": kept, "expert_flops_per_token": flops_per_kept_expert * kept,
                   "flops_vs_topk": kept / moe.top_k}
            rows.append({key: row[key] for key in SWEEP_COLUMNS})
            print(f"{moe.router.name} ({Path(arm.name).name}) α={alpha:g} τ={tau:g}: ppl {row['val_ppl']:.4g}, "
                  f"{row['active_experts']:.3g} experts per token, {row['drop_frac']:.1%} dropped", flush=True)
    return rows


def write_sweep(rows: list[dict], setup: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "sweep.json").write_text(json.dumps({**setup, "rows": rows}, indent=2) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    linestyles = ("-", "--", ":", "-.")
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        arm_rows = [r for r in rows if r["arm"] == arm]
        for j, tau in enumerate(dict.fromkeys(r["tau"] for r in arm_rows)):
            points = [r for r in arm_rows if r["tau"] == tau]
            dispatch = "top-k" if tau == 0 else f"τ={tau:g}"
            ax.plot([r["kept_experts"] for r in points], [r["val_ppl"] for r in points], color=f"C{i}",
                    linestyle=linestyles[j % len(linestyles)], marker="o",
                    label=f"{points[0]['router']} ({Path(arm).name}), {dispatch}")
            for r in points:
                ax.annotate(f"α={r['alpha']:g}", (r["kept_experts"], r["val_ppl"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    ax.set_xlabel("active experts per token and MoE layer (computed, after capacity drops)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Post-hoc sparsity: α is grmoe's concentration, 1/T for softmax routers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "ppl_vs_active_experts.png", dpi=120)
