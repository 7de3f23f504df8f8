"""Speed and memory of each router: the router alone, and whole training steps through the trainer.

    python scripts/benchmark.py --out runs/bench                       # quickstart scale, every router
    python scripts/benchmark.py --recipe recipes/350m_e8.yaml --routers softmax_topk mpi --out runs/bench_350m
    python scripts/benchmark.py --out runs/bench_compiled train.compile=true       # routers compiled, as on a GPU

Writes `OUT/benchmark.json` and `OUT/benchmark.md`:
- router_fwd_bwd_ms: forward + backward of one MoE layer's router on one micro-batch of tokens (median of
  repeats; `mpi` includes its power step through the experts' W1), with its ratio to softmax_topk;
- router_ops: the aten ops that forward + backward dispatches (counted with torch.profiler): host work that a GPU
  pays per op whatever the tensor sizes, so a router with many small ops can be slow there yet fast on CPU;
- step_s, tokens_per_s, mfu, peak_mem_gib: from the trainer's own throughput logging over `--steps` steps
  (the first step excluded), evaluation off.

    python scripts/benchmark.py --checkpoint --out runs/bench_ckpt        # checkpoint saves, 350m_e8 shape

`--checkpoint` instead times whole checkpoint saves through the trainer (`Trainer.save_checkpoint`, one process,
after one training step so that Adam's state exists), at the 350m_e8 width with 2 layers on CPU (`CHECKPOINT_SHAPE`,
changed by the overrides), for each `train.checkpoint_verify`: save_s (median of `--saves`), MB/s of checkpoint
bytes, and rehash_s, what hashing every file again after the save costs (the first release's way). Writes
`OUT/benchmark.json` and `OUT/benchmark.md`; about a minute and a half on 2 CPU cores with the data prepared.
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
from moe_lm.train.profiling import dispatched_ops

CHECKPOINT_SHAPE = ["model.n_layers=2", "model.seq_len=256", "model.vocab_size=8192", "train.micro_batch_size=1",
                    "train.grad_accum_steps=1", "train.precision=fp32", "parallel.zero_stage=0",
                    "data.sources=[stdlib]", "data.dir=data/stdlib", "data.vocab_size=4096", "train.max_steps=1000",
                    "train.eval_interval=100000", "train.log_interval=1", "train.keep_last=1", "wandb.mode=disabled"]
"""recipes/350m_e8.yaml (d_model 1024, 8 experts of d_ff 2816 on every other layer) cut to 2 layers, in fp32 ZeRO-0
(the CPU path; bf16 is ~30x slower on this kind of CPU), on the embedded stdlib corpus."""


def router_fwd_bwd(recipe: str, router: str, repeats: int, overrides: list[str]) -> tuple[float, int]:
    """(median ms, ops dispatched) of forward + backward of one MoE layer's router on one micro-batch of tokens;
    compiled as the trainer compiles it where the overrides set `train.compile=true`."""
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config(recipe, [f"model.moe.router.name={router}", *overrides])
    torch.manual_seed(0)
    layer = MoETransformer(cfg.model).moe_layers()[0]
    if cfg.train.compile:
        layer.router.compile()
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    x = torch.randn(tokens, cfg.model.d_model)
    token_ids = torch.randint(0, cfg.model.vocab_size, (tokens,))

    def fwd_bwd() -> None:
        w1 = layer.local_expert_w1() if layer.router.needs_expert_w1 else None
        out = layer.router(x, expert_w1_EFD=w1, token_ids_T=token_ids, sequence_length=cfg.model.seq_len)
        weights = out.weights_EC if out.expert_choice else out.weights_TK
        loss = weights.sum() + sum(out.aux_losses.values(), torch.zeros(()))
        if loss.requires_grad:  # a fixed router (hash) has nothing to learn
            loss.backward()

    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd()
    return 1000 * statistics.median(times[1:]), dispatched_ops(prof.events())


def checkpoint_save(recipe: str, overrides: list[str], out: Path, saves: int) -> dict:
    """Save timings through the trainer, in this process (a world of one)."""
    import moe_lm.moe.deepspeed_checkpoint as dsckpt
    from moe_lm.train import Trainer

    cfg = load_config(recipe, [*CHECKPOINT_SHAPE, f"run.dir={out / 'checkpoint_run'}", *overrides])
    trainer = Trainer(cfg, progress=False)
    trainer._train_step(log=False)  # Adam's state exists from the first step on
    results = {"recipe": recipe, "overrides": [*CHECKPOINT_SHAPE, *overrides], "threads": torch.get_num_threads(),
               "params": sum(p.numel() for p in trainer.model.parameters())}
    for verify in ("sha256", "size"):
        trainer.cfg.train.checkpoint_verify = verify
        times = []
        for _ in range(saves):
            start = time.perf_counter()
            path = trainer.save_checkpoint()
            times.append(time.perf_counter() - start)
        files = sorted(p for p in path.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        start = time.perf_counter()
        for file in files:
            dsckpt.file_entry(file, sha256=True)
        results[verify] = {"save_s": statistics.median(times), "save_times_s": times, "bytes": size,
                           "files": len(files),
                           "mb_per_s": size / 1e6 / statistics.median(times),
                           "rehash_s": time.perf_counter() - start}
        print(f"[checkpoint] verify={verify}: {results[verify]}", flush=True)
    return results


def write_checkpoint_report(results: dict, out: Path) -> None:
    lines = [f"# Checkpoint save: {results['recipe']}, {results['params'] / 1e6:.1f}M parameters, 1 process, "
             f"{results['threads']} threads", "", f"Overrides: `{' '.join(results['overrides'])}`", "",
             "| train.checkpoint_verify | save (s) | MB/s | checkpoint (MB) | files | re-hash after save (s) |",
             "|---|---|---|---|---|---|"]
    for verify in ("sha256", "size"):
        r = results[verify]
        lines.append(f"| {verify} | {r['save_s']:.2f} | {r['mb_per_s']:.0f} | {r['bytes'] / 1e6:.0f} | {r['files']} | "
                     f"{r['rehash_s']:.2f} |")
    lines.append("\nsave: median over the saves, the whole `Trainer.save_checkpoint` (DeepSpeed's writes, fsync, the "
                 "records, manifest, rename, rotation). re-hash: reading every file back and hashing it, as the "
                 "first release did after each save.")
    (out / "benchmark.json").write_text(json.dumps({"checkpoint_save": results}, indent=2))
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--routers", nargs="+", default=sorted(REGISTRY))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", action="store_true", help="time checkpoint saves instead (default recipe: "
                        "recipes/350m_e8.yaml at 2 layers)")
    parser.add_argument("--saves", type=int, default=2, help="saves per train.checkpoint_verify with --checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        recipe = args.recipe if args.recipe != parser.get_default("recipe") else "recipes/350m_e8.yaml"
        write_checkpoint_report(checkpoint_save(recipe, args.overrides, args.out, args.saves), args.out)
        return

    results = {}
    for router in args.routers:
        print(f"[{router}] router micro-benchmark", flush=True)
        router_ms, router_ops = router_fwd_bwd(args.recipe, router, args.repeats, args.overrides)
        print(f"[{router}] {args.steps} training steps", flush=True)
        summary = train(args.recipe, [f"model.moe.router.name={router}", f"train.max_steps={args.steps}",
                                      f"train.eval_interval={10 * args.steps}", "train.eval_batches=1",
                                      "wandb.mode=disabled", *args.overrides], args.out / router)
        results[router] = {"router_fwd_bwd_ms": router_ms, "router_ops": router_ops, "step_s": summary["step_time_s"],
                           "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"],
                           "peak_mem_gib": summary["peak_mem_gib"], "peak_flops_source": summary["peak_flops_source"]}
    base = results.get("softmax_topk")

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "–"

    lines = [f"# Router benchmark: {args.recipe}, {args.steps} steps, {torch.get_num_threads()} threads", "",
             "| router | router fwd+bwd (ms) | vs softmax_topk | router ops | step (s) | vs softmax_topk | tokens/s | "
             "MFU | peak mem (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        lines.append(f"| {router} | {r['router_fwd_bwd_ms']:.2f} | {ratio(r, 'router_fwd_bwd_ms')} | "
                     f"{r['router_ops']} | {r['step_s']:.3f} | {ratio(r, 'step_s')} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mfu']:.2%} | {r['peak_mem_gib']:.2f} |")
    lines.append(f"\nMFU peak: {next(iter(results.values()))['peak_flops_source']}. Router ops: aten ops dispatched "
                 "by one forward + backward of the router (views included), the host's work per layer and step; on a "
                 "GPU each non-view op is a kernel launch.")
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2))
    (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
