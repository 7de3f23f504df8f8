"""Every router result in one command: the shootout over seeds, the post-hoc sparsity sweep, the synthetic routing
benchmark, and `docs/results.md` regenerated from them (tables, PNG plots, and a verdict on each claim of the
GrMoE and MPI papers at this scale).

    python scripts/experiments.py --out runs/experiments                     # quickstart scale, seeds 1 2 3
    python scripts/experiments.py --out runs/experiments_long --long         # 4x the steps (train.max_steps=1200)
    python scripts/experiments.py --out runs/experiments --report-only       # rewrite docs/results.md from OUT

Finished runs are reused (a run with a summary.json is not retrained), so an interrupted call resumes. Parts:
1. shootout (`scripts/shootout.py`): every quickstart variant, one run per seed, into OUT/shootout;
2. sweep (`moe-lm eval --sweep`): grmoe's α arm and the variant trained for it (`grmoe_kappa`, α jittered)
   against softmax_topk's temperature arm, seed 1, dropless (so rows differ by routing alone), into OUT/sweep_*;
3. synthetic (`scripts/synthetic_routing.py`): planted subspaces, every router, the same seeds, into OUT/synthetic;
4. report: docs/results.md and its plots in docs/results/ (`--results` to write elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from shootout import quickstart_variants, run_variants

from moe_lm.config import load_config
from moe_lm.metrics.compare import Run, compare_runs, load_run
from moe_lm.model.transformer import count_parameters

REPO = Path(__file__).resolve().parents[1]
BASELINE = "softmax_topk"
GRMOE_VARIANTS = ("grmoe", "grmoe_kl", "grmoe_switch", "grmoe_kappa", "grmoe_nolik")
MPI_VARIANTS = ("mpi", "mpi_code")
SWEEP_ARMS = ("grmoe", "grmoe_kappa")
SWEEP_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SWEEP_TAUS = (0.5, 0.8, 0.9)
COLUMNS = (  # (header, metric key, format)
    ("val ppl", "val_ppl", "{:.2f}"),
    ("load CV", "moe/load_cv_mean", "{:.3f}"),
    ("max/mean load", "moe/max_over_mean_mean", "{:.2f}"),
    ("dead experts", "moe/dead_experts", "{:.1f}"),
    ("collapse rate", "moe/collapse_rate", "{:.3f}"),
    ("token entropy", "moe/token_entropy", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
)
PPL_TOLERANCE = 0.02  # "comparable perplexity": at most 2% above the baseline's mean
BALANCE_CLAIM = 0.15  # the low end of GrMoE's "15-30% improved load balance"
H200_BF16_FLOPS = 989e12


@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self, spec: str = "{:.3f}") -> str:
        if not self.values:
            return "–"
        return f"{spec.format(self.mean)} ± {spec.format(self.std)}"


@functools.lru_cache(maxsize=None)
def read_run(run_dir: Path) -> Run:
    """A run folder read once: the report asks each run for many metrics."""
    return load_run(run_dir, run_dir.name)


def metric(run_dirs: list[Path], key: str) -> Stat:
    """`key`'s final value (summary.json, else the last logged) over runs that have it."""
    values = [read_run(d).value(key) for d in run_dirs]
    return Stat([float(v) for v in values if v is not None and not math.isnan(float(v))])


def shootout_table(groups: dict[str, list[Path]]) -> list[str]:
    lines = ["| variant | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for variant, runs in groups.items():
        cells = [metric(runs, key).fmt(spec) for _, key, spec in COLUMNS]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def sweep_part(out: Path, groups: dict[str, list[Path]], results: Path) -> list[dict]:
    from moe_lm.eval.sweep import sweep

    rows = []
    baseline = groups[BASELINE][0]
    for arm in SWEEP_ARMS:
        if arm not in groups:
            continue
        sweep_dir = out / f"sweep_{arm}"
        if not (sweep_dir / "sweep.json").exists():
            sweep(groups[arm][0], list(SWEEP_ALPHAS), list(SWEEP_TAUS), out_dir=sweep_dir, dropless=True,
                  baseline=baseline)
        rows += [row for row in json.loads((sweep_dir / "sweep.json").read_text())["rows"]
                 if row["router"] != BASELINE or arm == SWEEP_ARMS[0]]
        shutil.copy(sweep_dir / "ppl_vs_active_experts.png", results / f"sweep_{arm}.png")
    return rows


def active_experts_curve(rows: list[dict], arm: str, tau: float) -> list[tuple[float, float, float]]:
    """(α, active experts, val ppl) of one arm at one τ, by α."""
    return sorted((r["alpha"], r["active_experts"], r["val_ppl"]) for r in rows
                  if Path(r["arm"]).name == arm and r["tau"] == tau)


def monotone_and_not_flat(curve: list[tuple[float, float, float]]) -> tuple[bool, bool]:
    """(active experts never rise with α, and they change over both halves of the α range)."""
    active = [a for _, a, _ in curve]
    monotone = all(later <= earlier + 1e-6 for earlier, later in zip(active, active[1:]))
    half = len(active) // 2
    moves = all(max(part) - min(part) > 0.05 for part in (active[:half + 1], active[half:]))
    return monotone, moves


def synthetic_part(out: Path, seeds: list[int], results: Path) -> tuple[str, list[dict]]:
    synthetic = out / "synthetic"
    if not (synthetic / "results.md").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "synthetic_routing.py"), "--seeds",
                        *map(str, seeds), "--out", str(synthetic)], check=True)
    for png in synthetic.glob("*.png"):
        shutil.copy(png, results / f"synthetic_{png.name}")
    return (synthetic / "results.md").read_text(), json.loads((synthetic / "results.json").read_text())["runs"]


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**supported**" if ok else "**not supported**")


def claims(groups: dict[str, list[Path]], sweep_rows: list[dict], command: str,
           synthetic_runs: list[dict] = ()) -> list[str]:
    base_ppl, base_cv = metric(groups[BASELINE], "val_ppl"), metric(groups[BASELINE], "moe/load_cv_mean")
    rows = ["| claim | measured here (mean ± std over seeds) | verdict at this scale |", "|---|---|---|"]

    grmoe = [v for v in GRMOE_VARIANTS if v in groups]
    collapse = {v: metric(groups[v], "moe/dead_experts") for v in grmoe}
    ok = bool(grmoe) and all(s.values and max(s.values) == 0 for s in collapse.values())
    rows.append("| GrMoE: 0% routing collapse across all seeds | dead experts per run: "
                + "; ".join(f"{v} {s.fmt('{:.1f}')}" for v, s in collapse.items()) + f" | {verdict(ok)} |")

    def balance(v: str) -> tuple[float, float]:
        cv, ppl = metric(groups[v], "moe/load_cv_mean"), metric(groups[v], "val_ppl")
        return 1 - cv.mean / base_cv.mean, ppl.mean / base_ppl.mean - 1

    scored = {v: balance(v) for v in grmoe}
    eligible = [v for v in grmoe if scored[v][1] <= PPL_TOLERANCE and max(collapse[v].values or [1]) == 0]
    best = max(eligible or grmoe, key=lambda v: scored[v][0]) if grmoe else None
    if best:
        gain, ppl_gap = scored[best]
        ok = gain >= BALANCE_CLAIM and ppl_gap <= PPL_TOLERANCE and max(collapse[best].values or [1]) == 0
        rows.append(f"| GrMoE: 15–30% better load balance at comparable perplexity | best variant `{best}`: load CV "
                    f"{metric(groups[best], 'moe/load_cv_mean').fmt()} vs {BASELINE} {base_cv.fmt()} "
                    f"({gain:+.0%} better), val ppl {metric(groups[best], 'val_ppl').fmt('{:.2f}')} vs "
                    f"{base_ppl.fmt('{:.2f}')} ({ppl_gap:+.1%}); every variant: "
                    + "; ".join(f"{v}: CV {-g:+.0%}, ppl {p:+.1%}" for v, (g, p) in scored.items())
                    + f" | {verdict(ok)} |")
    for variant in grmoe:
        spread = metric(groups[variant], "moe/stat/kappa_std")
        kappa = metric(groups[variant], "moe/stat/kappa_mean")
        rows.append(f"| GrMoE: experts learn heterogeneous concentrations (`{variant}`) | "
                    f"κ mean {kappa.fmt('{:.2f}')}, per-expert std {spread.fmt('{:.4f}')} at the end | "
                    f"{verdict(bool(spread.values) and spread.mean > 0.05)} (κ moves: std > 0.05) |")
    for arm in (a for a in SWEEP_ARMS if a in groups):
        curve = active_experts_curve(sweep_rows, groups[arm][0].name, max(SWEEP_TAUS))
        if not curve:
            continue
        monotone, moves = monotone_and_not_flat(curve)
        points = ", ".join(f"α={a:g}: {k:.2f}" for a, k, _ in curve)
        rows.append(f"| GrMoE: concentration trades sparsity smoothly and monotonically after training (`{arm}`, "
                    f"τ={max(SWEEP_TAUS)}, seed 1) | active experts {points} | "
                    f"{verdict(monotone and moves)} (monotone: {monotone}; moves over both halves of α: {moves}) |")
    temperature = active_experts_curve(sweep_rows, groups[BASELINE][0].name, max(SWEEP_TAUS))
    if temperature:
        monotone, moves = monotone_and_not_flat(temperature)
        rows.append(f"| GrMoE: softmax temperature scaling does *not* give such control | {BASELINE} at 1/T = α: "
                    + ", ".join(f"α={a:g}: {k:.2f}" for a, k, _ in temperature)
                    + f" | {verdict(not (monotone and moves))} (the baseline's curve is monotone: {monotone}, "
                      f"moves: {moves}) |")
    for variant in (v for v in GRMOE_VARIANTS if v in groups):
        angle = Stat([r["balanced"]["angle_deg"] for r in synthetic_runs if r["router"] == variant])
        if angle.values:
            rows.append(f"| GrMoE: recovers the planted subspaces of a synthetic routing task (`{variant}`) | mean "
                        f"principal angle {angle.fmt('{:.1f}')}° (scripts/synthetic_routing.py) | "
                        f"{verdict(angle.mean < 10)} (under 10°) |")
    rows.append("| GrMoE: amortized VI gives uncertainty-aware routing that resists collapse | VI variants are "
                "implemented (`variational: logit / concentration`) but not in this shootout | not measured |")

    for variant in (v for v in MPI_VARIANTS if v in groups):
        alignment = metric(groups[variant], "router/mpi/alignment_mean")
        specificity = metric(groups[variant], "router/mpi/specificity")
        pairwise = metric(groups[variant], "router/mpi/phi_pairwise_cos_mean")
        d_model = load_config(str(groups[variant][0] / "config.yaml")).model.d_model
        chance = math.sqrt(2 / (math.pi * d_model))
        ok = bool(alignment.values) and alignment.mean > 3 * chance and specificity.mean > 0.1
        rows.append(f"| MPI: router rows align with their own expert's top singular direction (`{variant}`) | "
                    f"\\|cos(φ_e, v₁e)\\| {alignment.fmt()} (chance {chance:.3f}), specificity {specificity.fmt()}, "
                    f"pairwise \\|cos(φ_e, φ_e')\\| {pairwise.fmt()} | {verdict(ok)} (alignment over 3x chance and "
                    f"specificity over 0.1) |")
        ppl = metric(groups[variant], "val_ppl")
        gap = ppl.mean / base_ppl.mean - 1
        ok = ppl.mean + ppl.std < base_ppl.mean - base_ppl.std
        rows.append(f"| MPI: more effective models than the baseline router (`{variant}`) | "
                    f"val ppl {ppl.fmt('{:.2f}')} vs {BASELINE} {base_ppl.fmt('{:.2f}')} ({gap:+.1%}) | "
                    f"{verdict(ok)} (needs a ppl below the baseline's by more than both seed spreads) |")
    rows += ["", f"Command: `{command}`. Load CV, dead experts and entropy are the trainer's final logged values "
                 "(load CV: over the last logging interval, averaged over layers; the claim's 'better load balance' is "
                 "the relative drop of its mean over seeds against the baseline's; docs/metrics.md). A verdict holds "
                 "only at this scale (quickstart: 4 layers of width 128, 8 experts, "
                 "top-2, 300 steps on the standard library), not for the papers' 350M–11B models."]
    return rows


def gpu_plan() -> list[str]:
    """Tokens, FLOPs and H200-hours of the preset runs at the MFU measured for 350m_e8, compiled and eager."""
    compiled_mfu, eager_mfu = 0.30, 0.243  # 350m_e8 on one H200, train.compile on and off (docs/performance.md)
    lines = [f"| run | total / active params | tokens | FLOPs | H200-hours at {compiled_mfu:.1%} MFU (measured, "
             f"compiled) | at {eager_mfu:.1%} (measured, eager) "
             "| what it settles |", "|---|---|---|---|---|---|---|"]
    settles = {
        "350m_e8": "the 350M/8-expert rows of both papers: balance, collapse and ppl of grmoe vs softmax_topk/aux_free",
        "1.3b_e16": "GrMoE's 1.3B/16 claims, and whether the post-hoc α curve stays monotone at E = 16",
        "2.7b_e32": "GrMoE's 2.7B/32 claims; MPI at its smallest published scale (1B+), with the code's options",
    }
    for preset, note in settles.items():
        cfg = load_config(str(REPO / "recipes" / f"{preset}.yaml"))
        counts = count_parameters(cfg.model)
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.seq_len * 32
        tokens = 20 * counts.active  # compute-optimal budget for the active parameters, 20 tokens/parameter
        flops = counts.flops_per_token * tokens
        hours = [flops / (H200_BF16_FLOPS * mfu) / 3600 for mfu in (compiled_mfu, eager_mfu)]
        lines.append(f"| {preset} ×3 routers ×3 seeds | {counts.total / 1e9:.2f}B / {counts.active / 1e9:.2f}B | "
                     f"{tokens / 1e9:.1f}B ({tokens / tokens_per_step:,.0f} steps of {tokens_per_step:,} on 32 GPUs) "
                     f"| {flops:.2e} per run | {9 * hours[0]:,.0f} | {9 * hours[1]:,.0f} | {note} |")
    lines += ["", "Tokens: 20 per active parameter (a compute-optimal budget; `train.max_steps` of "
                  "recipes/train/gpu_pretrain.yaml plans 300B, far more). FLOPs: training FLOPs per token "
                  "(`count_parameters(...).flops_per_token`: 6·N_active plus attention, forward and backward) × "
                  "tokens. Hours: 9 runs (3 routers × 3 seeds) on H200s at 989 dense bf16 TFLOP/s. "
                  f"{compiled_mfu:.1%} and {eager_mfu:.1%} MFU are 350m_e8's with and without `train.compile` (on in "
                  "the GPU recipes), measured on one H200 on 2026-11-28 (docs/performance.md); the larger presets "
                  "are not measured yet."]
    return lines


def report(out: Path, groups: dict[str, list[Path]], sweep_rows: list[dict], synthetic: tuple[str, list[dict]],
           results: Path, command: str) -> str:
    synthetic_md, synthetic_runs = synthetic
    shutil.copy(out / "shootout" / "compare" / "val_loss.png", results / "shootout_val_loss.png")
    shutil.copy(out / "shootout" / "compare" / "load_cv.png", results / "shootout_load_cv.png")
    lines = [f"# Router results: the papers' claims at quickstart scale ({date.today().isoformat()})", "",
             "Generated by `scripts/experiments.py` (do not edit by hand). Each verdict says whether a claim holds "
             "*at this scale*; none of it says what happens at 350M+ (see the GPU plan at the end).", "",
             "## Claims", "", *claims(groups, sweep_rows, command, synthetic_runs), "",
             "## Shootout", "", *shootout_table(groups), "",
             "tokens/s is what each run logged while sharing the machine with the other runs (one thread each): it "
             "ranks nothing; `scripts/benchmark.py` and `scripts/peer_benchmark.py` measure speed "
             "(docs/performance.md).", "",
             "![validation loss](results/shootout_val_loss.png)", "", "![load CV](results/shootout_load_cv.png)", "",
             "## Post-hoc sparsity sweep", "",
             f"Seed-1 runs, dropless evaluation on 256 validation sequences, α ∈ {list(SWEEP_ALPHAS)}, "
             f"τ ∈ {[0.0, *SWEEP_TAUS]}, k_max = E. GrMoE's α and the baseline's inverse temperature 1/T = α.", "",
             "| arm | α | τ | active experts | val ppl |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['arm']).name} | {r['alpha']:g} | {r['tau']:g} | {r['active_experts']:.2f} | "
              f"{r['val_ppl']:.2f} |" for r in sweep_rows if r["tau"] in (0.0, max(SWEEP_TAUS))]
    lines += [""] + [f"![sweep {arm}](results/sweep_{arm}.png)" for arm in SWEEP_ARMS if arm in groups]
    lines += ["", "## Synthetic routing benchmark", "", synthetic_md.strip(), "",
              "What the task measures and why GrMoE stops short of 10° (a frame of p = 8 dimensions can hold several "
              "planted planes, so one plane is left without an expert of its own): "
              "[docs/synthetic-routing.md](synthetic-routing.md).", "", "## GPU plan", "", *gpu_plan(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=quickstart_variants())
    parser.add_argument("--long", action="store_true", help="4x the quickstart's steps (train.max_steps=1200)")
    parser.add_argument("--report-only", action="store_true", help="use only runs already in OUT")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (OMP_NUM_THREADS): the figures depend on it through the order of "
                             "floating-point sums, so every run of one report uses the same count")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every training, sweep and synthetic run
    if BASELINE not in args.variants:
        parser.error(f"the variants must include the baseline {BASELINE}")
    overrides = ["train.max_steps=1200"] if args.long else []
    command = "python scripts/experiments.py --out runs/experiments" + (" --long" if args.long else "") + \
        (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [1, 2, 3] else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "")  # what reruns it all

    results_dir = args.results.parent / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    shootout = args.out / "shootout"
    if args.report_only:
        run_dirs = [shootout / f"{v}_s{s}" for v in args.variants for s in args.seeds]
        run_dirs = [d for d in run_dirs if (d / "summary.json").exists()]
    else:
        run_dirs = run_variants(args.variants, args.seeds, shootout, overrides)
    groups: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        groups.setdefault(run_dir.name.rsplit("_s", 1)[0], []).append(run_dir)
    compare_runs(run_dirs, shootout / "compare")
    sweep_rows = sweep_part(args.out, groups, results_dir)
    synthetic = synthetic_part(args.out, args.seeds, results_dir)
    args.results.write_text(report(args.out, groups, sweep_rows, synthetic, results_dir, command),
                            encoding="utf-8")
    print(f"wrote {args.results} and {results_dir}/")


if __name__ == "__main__":
    main()
