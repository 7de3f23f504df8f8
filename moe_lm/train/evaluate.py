"""`moe-lm eval`: a trained checkpoint evaluated under a grid of post-hoc routing knobs, without retraining.

For routers with a sharpness knob (`set_alpha`, e.g. grmoe's α in g^(α) = softmax(α·s)) and a mass-threshold
dispatch (`set_eval_threshold`: the smallest set of experts holding mass τ, at most k_max), each (α, τ) setting
gets the validation perplexity, routing entropy, top-k mass, mean active experts per token and tokens/s, written
to `OUT/sweep.csv`, `OUT/sweep.json` and the Pareto plot `OUT/ppl_vs_active_experts.png`.
Runs in one process on the consolidated checkpoint (every expert local), so any training layout can be swept.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

from moe_lm.data import PackedDataset, make_batch, open_split
from moe_lm.export import config_from_dict, consolidated_state_dict
from moe_lm.metrics import RoutingTracker
from moe_lm.model.transformer import MoETransformer

SWEEP_COLUMNS = ("alpha", "tau", "max_experts", "val_loss", "val_ppl", "active_experts", "token_entropy",
                 "topk_mass", "effective_experts", "tokens_per_s")


def load_model(checkpoint: str | Path) -> tuple[MoETransformer, object]:
    """(model in eval mode with every expert local, its config) from a checkpoint, run or checkpoints directory."""
    state, manifest = consolidated_state_dict(checkpoint)
    cfg = config_from_dict(manifest["config"])
    model = MoETransformer(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


@torch.no_grad()
def evaluate_setting(model: MoETransformer, data: PackedDataset, num_samples: int, batch_size: int) -> dict[str, float]:
    """Loss over the first `num_samples` validation sequences and the routing metrics of that pass."""
    layers = model.moe_layers()
    tracker = RoutingTracker(len(layers), model.cfg.moe.num_experts)
    loss_sum = tokens = 0.0
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        inputs, targets = make_batch(data, [i % len(data) for i in range(first, min(first + batch_size, num_samples))])
        _, lm_loss, _ = model(inputs, targets)
        loss_sum += lm_loss.item() * targets.numel()
        tokens += targets.numel()
        for i, layer in enumerate(layers):
            tracker.record(i, layer.gate.record)
    seconds = time.perf_counter() - start
    routing = tracker.compute()
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss), "active_experts": routing["moe/active_experts"],
            "token_entropy": routing["moe/token_entropy"], "topk_mass": routing["moe/topk_mass"],
            "effective_experts": routing["moe/effective_experts"], "tokens_per_s": tokens / seconds}


def sweep(checkpoint: str | Path, alphas: list[float], taus: list[float], max_experts: int | None,
          num_samples: int, out_dir: str | Path, data_dir: str | None = None) -> list[dict[str, float]]:
    model, cfg = load_model(checkpoint)
    routers = [layer.router for layer in model.moe_layers()]
    if not all(hasattr(r, "set_alpha") and hasattr(r, "set_eval_threshold") for r in routers):
        raise ValueError(f"router {cfg.model.moe.router.name!r} has no post-hoc knobs (set_alpha, set_eval_threshold); "
                         "the sweep needs a router such as grmoe")
    data = PackedDataset(open_split(Path(data_dir or cfg.data.dir), "val"), cfg.model.seq_len)
    k_max = max_experts or cfg.model.moe.top_k
    for layer in model.moe_layers():
        layer.gate.record_always = True
    rows = []
    for tau in taus:
        for alpha in alphas:
            for router in routers:
                router.set_alpha(alpha)
                router.set_eval_threshold(tau, k_max)
            result = evaluate_setting(model, data, num_samples, cfg.train.micro_batch_size)
            rows.append({"alpha": alpha, "tau": tau, "max_experts": k_max, **result})
            print(" ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()), flush=True)
    _write(rows, Path(out_dir), str(checkpoint))
    return rows


def _write(rows: list[dict[str, float]], out_dir: Path, checkpoint: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "sweep.json").write_text(json.dumps({"checkpoint": checkpoint, "rows": rows}, indent=2))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for tau in sorted({r["tau"] for r in rows}):
        points = [r for r in rows if r["tau"] == tau]
        label = "top-k dispatch" if tau == 0 else f"mass threshold τ={tau:g}"
        ax.plot([r["active_experts"] for r in points], [r["val_ppl"] for r in points], marker="o", label=label)
        for r in points:
            ax.annotate(f"α={r['alpha']:g}", (r["active_experts"], r["val_ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean active experts per token")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Post-hoc sparsity: perplexity vs active experts (one model, α swept)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ppl_vs_active_experts.png", dpi=120)
