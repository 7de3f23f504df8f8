"""Which router is better here? Train each variant's recipe with several seeds, then compare.

    python scripts/shootout.py --out runs/shootout                          # every quickstart variant, 2 seeds
    python scripts/shootout.py --variants softmax_topk mpi --seeds 1 2 3 --out runs/shootout train.max_steps=600

A variant is a recipe: `softmax_topk` is `recipes/quickstart.yaml`, any other name N is
`recipes/quickstart_N.yaml` (every router of the registry, and variants such as `aux_free`). Runs go to
OUT/<variant>_s<seed>; the report (`moe-lm compare`: a Markdown table with a mean ± std row per variant over
seeds, and PNG plots) goes to OUT/compare. A finished run (summary.json present) is not rerun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import train
from tqdm import tqdm

from moe_lm.metrics.compare import compare_runs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def variant_recipe(variant: str) -> Path:
    return RECIPES / ("quickstart.yaml" if variant == "softmax_topk" else f"quickstart_{variant}.yaml")


def quickstart_variants() -> list[str]:
    """Every variant with a quickstart recipe: the baseline first, then the others by name."""
    return ["softmax_topk"] + sorted(p.stem.removeprefix("quickstart_") for p in RECIPES.glob("quickstart_*.yaml"))


def run_variants(variants: list[str], seeds: list[int], out: Path, overrides: list[str]) -> list[Path]:
    """Train every (variant, seed) not finished yet into OUT/<variant>_s<seed>; return the run folders, variant-major.
    Seeds go in the outer loop, so an interrupted shootout has every variant at its first seeds."""
    missing = [v for v in variants if not variant_recipe(v).exists()]
    if missing:
        raise SystemExit(f"no recipe for {missing}: expected {[str(variant_recipe(v)) for v in missing]}")
    todo = [(variant, seed) for seed in seeds for variant in variants]
    for variant, seed in tqdm(todo, desc="shootout", unit="run"):
        run_dir = out / f"{variant}_s{seed}"
        if (run_dir / "summary.json").exists():
            continue
        tqdm.write(f"training {run_dir.name}")
        train(str(variant_recipe(variant)), [f"train.seed={seed}", f"run.name={run_dir.name}", *overrides], run_dir)
    return [out / f"{variant}_s{seed}" for variant in variants for seed in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=quickstart_variants())
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    run_dirs = run_variants(args.variants, args.seeds, args.out, args.overrides)
    report = compare_runs(run_dirs, args.out / "compare")
    print(report.read_text())


if __name__ == "__main__":
    main()
