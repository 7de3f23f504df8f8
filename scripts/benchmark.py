"""Speed and memory of each router: the router alone, and whole training steps through the trainer.

    python scripts/benchmark.py --out runs/bench                       # quickstart scale, every router
    python scripts/benchmark.py --recipe recipes/350m_e8.yaml --routers softmax_topk mpi --out runs/bench_350m

Writes `OUT/benchmark.json` and `OUT/benchmark.md`:
- router_fwd_bwd_ms: forward + backward of one MoE layer's router on one micro-batch of tokens (median of
  repeats; `mpi` includes its power step through the experts' W1), with its ratio to softmax_topk;
- step_s, tokens_per_s, mfu, peak_mem_gib: from the trainer's own throughput logging over `--steps` steps
  (the first step excluded), evaluation off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from runs import train

from moe_lm.config import load_config
from moe_lm.model.transformer import MoETransformer
from moe_lm.routers import REGISTRY


def router_fwd_bwd_ms(recipe: str, router: str, repeats: int) -> float:
    cfg = load_config(recipe, [f"model.moe.router.name={router}"])
    torch.manual_seed(0)
    layer = MoETransformer(cfg.model).moe_layers()[0]
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    x = torch.randn(tokens, cfg.model.d_model)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        w1 = layer.local_expert_w1() if layer.router.needs_expert_w1 else None
        out = layer.router(x, expert_w1_EFD=w1)
        (out.weights_TK.sum() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--routers", nargs="+", default=sorted(REGISTRY))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results = {}
    for router in args.routers:
        print(f"[{router}] router micro-benchmark", flush=True)
        router_ms = router_fwd_bwd_ms(args.recipe, router, args.repeats)
        print(f"[{router}] {args.steps} training steps", flush=True)
        summary = train(args.recipe, [f"model.moe.router.name={router}", f"train.max_steps={args.steps}",
                                      f"train.eval_interval={10 * args.steps}", "train.eval_batches=1",
                                      "wandb.mode=disabled", *args.overrides], args.out / router)
        results[router] = {"router_fwd_bwd_ms": router_ms, "step_s": summary["step_time_s"],
                           "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"],
                           "peak_mem_gib": summary["peak_mem_gib"], "peak_flops_source": summary["peak_flops_source"]}
    base = results.get("softmax_topk")

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "–"

    lines = [f"# Router benchmark: {args.recipe}, {args.steps} steps, {torch.get_num_threads()} threads", "",
             "| router | router fwd+bwd (ms) | vs softmax_topk | step (s) | vs softmax_topk | tokens/s | MFU | "
             "peak mem (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        lines.append(f"| {router} | {r['router_fwd_bwd_ms']:.2f} | {ratio(r, 'router_fwd_bwd_ms')} | "
                     f"{r['step_s']:.3f} | {ratio(r, 'step_s')} | {r['tokens_per_s']:,.0f} | {r['mfu']:.2%} | "
                     f"{r['peak_mem_gib']:.2f} |")
    lines.append(f"\nMFU peak: {next(iter(results.values()))['peak_flops_source']}.")
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2))
    (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
