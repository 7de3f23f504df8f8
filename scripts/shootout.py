"""Which router is better here? Train one recipe with each router and several seeds, then compare.

    python scripts/shootout.py --out runs/shootout                          # quickstart, every router, 2 seeds
    python scripts/shootout.py --routers softmax_topk mpi --seeds 1 2 3 --out runs/shootout train.max_steps=600

Runs go to OUT/<router>_s<seed>; the report (`moe-lm compare`: a Markdown table with a mean ± std row per
router over seeds, and PNG plots) goes to OUT/compare. A finished run (summary.json present) is not rerun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import train

from moe_lm.metrics.compare import compare_runs
from moe_lm.routers import REGISTRY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--routers", nargs="+", default=sorted(REGISTRY))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()

    run_dirs = []
    for router in args.routers:
        for seed in args.seeds:
            run_dir = args.out / f"{router}_s{seed}"
            run_dirs.append(run_dir)
            if (run_dir / "summary.json").exists():
                continue
            print(f"training {run_dir.name}", flush=True)
            train(args.recipe, [f"model.moe.router.name={router}", f"train.seed={seed}",
                                f"run.name={run_dir.name}", *args.overrides], run_dir)
    report = compare_runs(run_dirs, args.out / "compare")
    print(report.read_text())


if __name__ == "__main__":
    main()
