"""Throughput against the number of experts at fixed active compute (top-k and expert width unchanged).

    python scripts/expert_scaling.py --out runs/expert_scaling                        # quickstart, E = 8 .. 64
    python scripts/expert_scaling.py --recipe recipes/quickstart.yaml --experts 8 64 --steps 40 --out runs/es

Each setting trains `--steps` steps through `moe-lm train` (evaluation off) and reads the trainer's own tokens/s
(the first step excluded). Writes `OUT/expert_scaling.json` and `OUT/expert_scaling.md` with each setting's
tokens/s relative to the smallest expert count: a flat line means routing, dispatch and the optimizer do not grow
with the number of experts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from runs import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results = {}
    for num_experts in args.experts:
        print(f"[E={num_experts}] {args.steps} training steps", flush=True)
        summary = train(args.recipe, [f"model.moe.num_experts={num_experts}", f"train.max_steps={args.steps}",
                                      f"train.eval_interval={10 * args.steps}", "train.eval_batches=1",
                                      "wandb.mode=disabled", *args.overrides], args.out / f"e{num_experts}")
        results[num_experts] = {"tokens_per_s": summary["tokens_per_s"], "step_s": summary["step_time_s"],
                                "params_total": summary["params_total"], "params_active": summary["params_active"]}
    base = results[args.experts[0]]["tokens_per_s"]
    lines = [f"# Throughput vs experts: {args.recipe} {' '.join(args.overrides)}, {args.steps} steps, "
             f"{torch.get_num_threads()} threads", "",
             f"| experts | total params | active params | step (s) | tokens/s | vs E={args.experts[0]} |",
             "|---|---|---|---|---|---|"]
    for num_experts, r in results.items():
        lines.append(f"| {num_experts} | {r['params_total']:,} | {r['params_active']:,} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |")
    (args.out / "expert_scaling.json").write_text(json.dumps(results, indent=2))
    (args.out / "expert_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
