"""Throughput against the number of experts at fixed active compute (top-k and expert width unchanged).

    python scripts/expert_scaling.py --out runs/expert_scaling                        # quickstart, E = 8 .. 64
    python scripts/expert_scaling.py --recipe recipes/quickstart.yaml --experts 8 64 --steps 40 --out runs/es
    python scripts/expert_scaling.py --experts 8 64 --profile --out runs/es_profile  # where the extra time goes
    python scripts/expert_scaling.py --experts 8 64 --kernels --out runs/es_kernels  # the expert GEMMs alone

Each setting trains `--steps` steps through `moe-lm train` (evaluation off) and reads the trainer's own tokens/s
(the first step excluded). Writes `OUT/expert_scaling.json` and `OUT/expert_scaling.md` with each setting's
tokens/s relative to the smallest expert count: a flat line means routing, dispatch and the optimizer do not grow
with the number of experts.

`--profile` instead profiles the model alone (forward, backward, fused AdamW; no DeepSpeed, no data) for 3 steps on
one thread at each expert count, and writes torch.profiler's op table per setting (`OUT/profile_e<E>.txt`) and the
self CPU time of the ops that grow most (`OUT/profile.md`).

`--kernels` times the experts' SwiGLU alone, forward and backward, at each expert count with the recipe's shape
and the current thread count: the grouped kernel over the T·K routed rows (`dispatch.grouped_swiglu`, what one
process runs) against batched matmuls over capacity-padded buffers (`dispatch.batched_swiglu`, what expert
parallelism runs). Writes `OUT/kernels.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from runs import train


BOUND_OPS = ("aten::_fused_adamw_", "aten::mm")
"""What grows with the number of experts whatever the implementation: the optimizer over all expert parameters,
and the expert matrix products, cut into more and smaller GEMMs (on one process, the CPU `_grouped_mm` is a loop
of `mm`)."""


def profile_ops(recipe: str, num_experts: int, overrides: list[str], steps: int = 3) -> tuple[dict[str, tuple], str]:
    """({op: (self CPU seconds, calls)}, the profiler's table) over `steps` optimizer steps after 2 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    from moe_lm.config import load_config
    from moe_lm.model.transformer import MoETransformer

    cfg = load_config(recipe, [f"model.moe.num_experts={num_experts}", *overrides])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len))

    def step() -> None:
        _, lm_loss, aux_loss = model(ids, ids.roll(-1, 1))
        (lm_loss + aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    ops = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in averages}
    return ops, averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)


def time_kernels(recipe: str, num_experts: int, overrides: list[str], repeats: int = 20) -> dict[str, float]:
    """Median seconds of forward + backward of the experts' SwiGLU over one micro-batch's routed rows, balanced
    across the experts: the grouped kernel over exactly T·K rows, and the batched one over E buffers of the
    training capacity."""
    from moe_lm.config import load_config
    from moe_lm.moe.deepspeed_moe import expert_capacity
    from moe_lm.moe.dispatch import batched_swiglu, grouped_swiglu

    cfg = load_config(recipe, [f"model.moe.num_experts={num_experts}", *overrides])
    moe, d = cfg.model.moe, cfg.model.d_model
    width = moe.expert_width(cfg.model.d_ff)
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    rows, capacity = tokens * moe.top_k, expert_capacity(tokens, moe.top_k, num_experts, moe.capacity_factor,
                                                         moe.min_capacity)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).requires_grad_()
               for shape in ((num_experts, width, d), (num_experts, width, d), (num_experts, d, width))]
    group_end = torch.linspace(rows / num_experts, rows, num_experts).round().to(torch.int32)
    inputs = {"grouped": torch.randn(rows, d, generator=generator),
              "batched": torch.randn(num_experts, capacity, d, generator=generator)}
    kernels = {"grouped": lambda x: grouped_swiglu(x, *weights, group_end, impl="grouped"),
               "batched": lambda x: batched_swiglu(x, *weights)}
    seconds = {}
    for name, kernel in kernels.items():
        x = inputs[name].requires_grad_()
        times = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            y = kernel(x)
            y.backward(torch.ones_like(y))
            for leaf in (x, *weights):  # as a training step leaves them: no accumulation into old gradients
                leaf.grad = None
            if i >= 3:
                times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def write_kernels(args: argparse.Namespace) -> None:
    lines = [f"# Expert SwiGLU, forward + backward: {args.recipe}, {torch.get_num_threads()} threads", "",
             "| experts | grouped, T·K rows (ms) | batched, E × capacity rows (ms) | grouped / batched |",
             "|---|---|---|---|"]
    for num_experts in args.experts:
        seconds = time_kernels(args.recipe, num_experts, args.overrides)
        lines.append(f"| {num_experts} | {seconds['grouped'] * 1e3:.2f} | {seconds['batched'] * 1e3:.2f} | "
                     f"{seconds['grouped'] / seconds['batched']:.2f}x |")
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_profile(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # equal terms: larger GEMMs would also gain more from more threads
    profiles = {}
    for num_experts in args.experts:
        ops, table = profile_ops(args.recipe, num_experts, args.overrides)
        (args.out / f"profile_e{num_experts}.txt").write_text(table)
        profiles[num_experts] = ops
    first, last = args.experts[0], args.experts[-1]
    totals = {e: sum(seconds for seconds, _ in ops.values()) for e, ops in profiles.items()}

    def growth_of(op: str) -> float:
        return profiles[last].get(op, (0.0, 0))[0] - profiles[first].get(op, (0.0, 0))[0]

    growth = sorted(set(profiles[first]) | set(profiles[last]), key=lambda op: -growth_of(op))

    bound = totals[first] / (totals[first] + sum(growth_of(op) for op in BOUND_OPS))
    lines = [f"# Self CPU time of 3 steps by op: {args.recipe}, 1 thread", "",
             f"Total: {totals[first]:.2f} s at E={first}, {totals[last]:.2f} s at E={last} "
             f"({totals[first] / totals[last]:.2f}x).", "",
             f"Bound: if nothing but {' and '.join(f'`{op}`' for op in BOUND_OPS)} grew, E={last} would run at "
             f"{bound:.2f}x E={first}'s speed (the optimizer steps {last // first}x the expert parameters; the same "
             f"expert FLOPs come in {last // first}x smaller matrix products).", "",
             f"| op | E={first} s (calls) | E={last} s (calls) | growth s |", "|---|---|---|---|"]
    for op in growth[:10]:
        (a, ca), (b, cb) = profiles[first].get(op, (0.0, 0)), profiles[last].get(op, (0.0, 0))
        lines.append(f"| `{op}` | {a:.3f} ({ca}) | {b:.3f} ({cb}) | {b - a:+.3f} |")
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", action="store_true", help="profile the model's ops instead of training")
    parser.add_argument("--kernels", action="store_true", help="time the expert kernels alone instead of training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile or args.kernels:
        from moe_lm.config import load_config
        from moe_lm.train.host_memory import keep_freed_host_memory

        if load_config(args.recipe, args.overrides).train.keep_freed_host_memory:  # as the trainer runs on CPU
            keep_freed_host_memory()
        (write_profile if args.profile else write_kernels)(args)
        return

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
