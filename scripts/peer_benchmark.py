"""moe-lm against HF transformers' `MixtralForCausalLM` at one shape: training throughput, MFU and peak memory.

    python scripts/peer_benchmark.py --out runs/peer                      # the CPU peer shape, every router
    python scripts/peer_benchmark.py --out runs/peer_gpu --layers 8 --d 1024 --heads 16 --ffn 2816 \
        --vocab 50304 --seq 2048 --batch 8                                # the GPU peer shape
    python scripts/peer_benchmark.py --out runs/peer --routers softmax_topk -- train.compile=true
    python scripts/peer_benchmark.py --out runs/peer_profile --routers --profile  # + op tables of both sides

Writes `OUT/peer.json` and `OUT/peer.md` (printed too), and each side's log under `OUT/logs/`:
- moe-lm: `recipes/quickstart.yaml` with the shape as overrides, MoE on every layer, untied embeddings, one
  micro-batch per step and dropless routing (HF Mixtral drops no token, so both sides compute the same thing).
  `Trainer._train_step()` is timed: forward, backward, the optimizer step and the routing tracker. Precision is
  the trainer's "auto": bf16 on CUDA (DeepSpeed bf16), fp32 on CPU. Extra key=value overrides, positional or
  after `--`, apply to the moe-lm side only.
- HF: the same shape with SDPA attention, the Switch aux loss (coefficient 0.01, as moe-lm's baseline router),
  gradient clipping at moe-lm's `train.grad_clip`, torch AdamW (fused where the device runs it), bf16 autocast
  over fp32 weights on CUDA (the HF Trainer's bf16 mode), fp32 on CPU; once per `--hf-experts` implementation.
  The ratio is moe-lm's tokens/s over the best HF implementation's.
- `--routers`: every moe-lm router at the same shape, as step time over softmax_topk's. A router with its own
  quickstart recipe (`recipes/quickstart_<router>.yaml`) takes that recipe's router settings.

Each run is its own process (`--worker`): DeepSpeed keeps process groups in module state, and peak memory is per
process. On CPU, HF's workers keep freed host memory in the heap (`moe_lm/train/host_memory.py`), as moe-lm's
trainer does there by default (`train.keep_freed_host_memory`), so that both sides run in equal processes. The
baseline (moe-lm softmax_topk) runs again after the HF runs and after each router, and every ratio is taken
against the mean of the two baseline runs around it, so that a machine that speeds up or slows down during the
benchmark (CPU frequency, other load) does not favour whichever side ran first. Timing: `--warmup` untimed
steps, then the median of `--steps` steps, each ended by a device sync; tokens/s = batch · seq / median step. Peak
memory: `torch.cuda.max_memory_allocated` over the timed steps on CUDA; on CPU the worker's peak resident set
(interpreter and libraries included). MFU for both sides uses moe-lm's FLOPs per token
(`count_parameters(...).flops_per_token`, torchtitan's convention; the shapes are the same) against
`peak_flops(device, dtype)`, which on CPU is a matmul probe, not a datasheet number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

BASE_RECIPE = "recipes/quickstart.yaml"
BASELINE_ROUTER = "softmax_topk"
AUX_LOSS_COEF = 0.01  # HF Mixtral's router_aux_loss_coef; moe-lm's softmax_topk recipe uses the same value
SHAPE_DEFAULTS = dict(layers=4, d=256, heads=4, experts=8, topk=2, ffn=512, vocab=8192, seq=256, batch=8)
"""The CPU peer shape (docs in ../shared/docs/gpu-notes.md): about 18M parameters, 2,048 tokens a step."""


def moe_lm_overrides(shape: dict, data_dir: str, lr: float, steps: int, run_dir: Path) -> list[str]:
    """Recipe overrides that give moe-lm the peer shape (the recipe's own values fill the rest)."""
    return [f"model.n_layers={shape['layers']}", f"model.d_model={shape['d']}", f"model.n_heads={shape['heads']}",
            f"model.moe.num_experts={shape['experts']}", f"model.moe.top_k={shape['topk']}",
            "model.moe.layer_freq=1", f"model.d_ff={shape['ffn']}", f"model.vocab_size={shape['vocab']}",
            f"model.seq_len={shape['seq']}", f"train.micro_batch_size={shape['batch']}",
            "model.tie_embeddings=false", "train.grad_accum_steps=1", "wandb.mode=disabled",
            "model.moe.drop_tokens=false", f"train.lr={lr}", f"train.max_steps={steps}",
            f"data.dir={data_dir}", f"run.dir={run_dir}"]


def router_recipe(router: str) -> str:
    own = Path(f"recipes/quickstart_{router}.yaml")
    return str(own) if router != BASELINE_ROUTER and own.exists() else BASE_RECIPE


# ---------------------------------------------------------------- workers: one training run each, own process

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30


def _optimizer_kind(optimizer: object) -> str:
    defaults = getattr(optimizer, "defaults", None)
    if not isinstance(defaults, dict):
        return "unknown"
    name = type(optimizer).__name__
    if defaults.get("fused"):
        return f"{name} fused"
    if defaults.get("foreach"):
        return f"{name} foreach"
    return f"{name} default (foreach on CUDA, for-loop on CPU)"


def _fused_adamw_works(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs here (CUDA always; CPU in recent torch)."""
    try:
        param = torch.nn.Parameter(torch.zeros(4, device=device))
        param.grad = torch.ones_like(param)
        torch.optim.AdamW([param], fused=True).step()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _time_steps(step, device: torch.device, warmup: int, steps: int,
                profile_to: str | None = None) -> tuple[list[float], float]:
    """Run `step()` warmup + steps times; return the timed steps' seconds and the peak memory over them. With
    `profile_to`, 3 more steps then run under torch.profiler, and their op tables (`moe_lm.train.profiling`: self
    time by input shape; on CUDA the GPU's busy share first) are written there: where each side's time goes,
    outside the timed steps."""
    times = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = _peak_mem_gib(device)
    if profile_to:
        from moe_lm.train.profiling import StepProfiler

        profiler = StepProfiler(device)
        profiler.start()
        for _ in range(3):
            step()
        Path(profile_to).write_text(profiler.stop("3 steps"))
    return times, peak


def run_moe_lm(spec: dict) -> dict:
    from moe_lm.config import load_config
    from moe_lm.model.transformer import count_parameters
    from moe_lm.train import Trainer

    cfg = load_config(spec["recipe"], spec["overrides"])
    trainer = Trainer(cfg, progress=False)
    device = _device()
    losses = []

    def step() -> None:
        metrics = trainer._train_step()
        losses.append(metrics.get("train/loss") if isinstance(metrics, dict) else None)

    times, peak = _time_steps(step, device, spec["warmup"], spec["steps"], spec.get("profile_to"))
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    # the optimizer is only named in the report: looked up, not relied on
    optimizer = getattr(trainer, "client_optimizer", None) or getattr(trainer, "optimizer", None)
    return {"tokens_per_step": trainer.tokens_per_step, "step_times_s": times, "peak_mem_gib": peak,
            "params": count_parameters(cfg.model).total, "precision": "bf16 (DeepSpeed)" if bf16 else "fp32",
            "optimizer": _optimizer_kind(optimizer), "router": cfg.model.moe.router.name,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_hf(spec: dict) -> dict:
    from transformers import MixtralConfig, MixtralForCausalLM

    shape, device = spec["shape"], _device()
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["ffn"],
                           num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                           num_key_value_heads=shape["heads"], num_local_experts=shape["experts"],
                           num_experts_per_tok=shape["topk"], max_position_embeddings=shape["seq"],
                           output_router_logits=True, router_aux_loss_coef=AUX_LOSS_COEF, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    config._experts_implementation = spec["experts"]  # a plain attribute (ignored) before transformers 5
    with torch.device(device):  # build on the device: no host-side init and copy of the weights
        model = MixtralForCausalLM(config).train()
    fused = _fused_adamw_works(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=fused or None)
    params = list(model.parameters())
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    bf16 = device.type == "cuda"
    losses = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss  # labels are shifted inside
        loss.backward()
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times, peak = _time_steps(step, device, spec["warmup"], spec["steps"], spec.get("profile_to"))
    return {"tokens_per_step": shape["batch"] * shape["seq"], "step_times_s": times, "peak_mem_gib": peak,
            "params": sum(p.numel() for p in params),
            "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32", "optimizer": _optimizer_kind(optimizer),
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "attn_implementation": model.config._attn_implementation,
            "loss_first": losses[0].item(), "loss_last": losses[-1].item()}


def worker(spec_path: str) -> None:
    from moe_lm.train.host_memory import keep_freed_host_memory

    spec = json.loads(Path(spec_path).read_text())
    if spec["side"] == "hf" and _device().type == "cpu":  # what moe-lm's trainer does there by default
        keep_freed_host_memory()
    result = (run_moe_lm if spec["side"] == "moe-lm" else run_hf)(spec)
    median = statistics.median(result["step_times_s"])
    device = _device()
    result.update(step_s=median, tokens_per_s=result["tokens_per_step"] / median, threads=torch.get_num_threads(),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the driver

def launch(name: str, spec: dict, out: Path, timeout_s: float) -> dict:
    """Run one worker process; its result, or {"error": ...} with the log's tail."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log = out / "logs" / f"{name}.spec.json", out / "logs" / f"{name}.json", \
        out / "logs" / f"{name}.log"
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_path)}
    if spec.pop("profile", False):
        spec["profile_to"] = str(out / "logs" / f"{name}.profile.txt")
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"[{name}] running, log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as log_file:
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s)
            error = None if done.returncode == 0 else f"exit code {done.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    if error is None and result_path.exists():
        result = json.loads(result_path.read_text())
        print(f"[{name}] {result['tokens_per_s']:,.0f} tokens/s, step {result['step_s']:.4f} s, "
              f"{wall:.0f} s wall", flush=True)
        return {**result, "wall_s": wall}
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] FAILED ({error or 'no result'}):\n  " + "\n  ".join(tail), flush=True)
    return {"error": error or "no result written", "log": str(log), "log_tail": tail, "wall_s": wall}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"CPU: {model or 'unknown'} ({os.cpu_count()} cores)"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result


def bracketed(before: dict, after: dict) -> dict:
    """The baseline as measured around other runs: `before` with the mean step time of both runs (and the
    tokens/s of that step), or whichever of the two ran where the other failed."""
    if not (_ok(before) and _ok(after)):
        return before if _ok(before) else after
    step_s = (before["step_s"] + after["step_s"]) / 2
    return {**before, "step_s": step_s, "tokens_per_s": before["tokens_per_s"] * before["step_s"] / step_s,
            "peak_mem_gib": max(before["peak_mem_gib"], after["peak_mem_gib"]),
            "bracket_step_s": [before["step_s"], after["step_s"]]}


def render(report: dict) -> str:
    def fmt(value, spec: str, suffix: str = "") -> str:
        return "–" if value is None else f"{value:{spec}}{suffix}"

    shape, lines = report["shape"], []
    lines += [f"# Peer benchmark: moe-lm vs HF MixtralForCausalLM ({report['device']})", "",
              f"Shape: {shape['layers']} layers, d {shape['d']}, {shape['heads']} heads, {shape['experts']} experts "
              f"top-{shape['topk']} on every layer, ffn {shape['ffn']}, vocab {shape['vocab']}, seq {shape['seq']} "
              f"× batch {shape['batch']} ({shape['seq'] * shape['batch']:,} tokens a step); {report['warmup']} "
              f"warm-up + median of {report['steps']} steps.", "",
              "| side | tokens/s | step (s) | MFU | peak mem (GiB) | vs HF best | precision | optimizer |",
              "|---|---|---|---|---|---|---|---|"]
    rows = [("moe-lm " + BASELINE_ROUTER, report["moe_lm"], report.get("ratio"))]
    rows += [(f"HF Mixtral, experts {impl}", r, None) for impl, r in report["hf"].items()]
    for label, r, ratio in rows:
        if not _ok(r):
            lines.append(f"| {label} | failed: {r.get('error') if r else 'not run'} | | | | | | |")
            continue
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {r['step_s']:.4f} | {fmt(r.get('mfu'), '.2%')} | "
                     f"{r['peak_mem_gib']:.2f} | {fmt(ratio, '.2f', 'x')} | {r['precision']} | {r['optimizer']} |")
    if report.get("hf_best"):
        bracket = report["moe_lm"].get("bracket_step_s") if _ok(report["moe_lm"]) else None
        lines.append(f"\nRatio: moe-lm tokens/s over HF's best ({report['hf_best']}): "
                     f"**{fmt(report.get('ratio'), '.2f', 'x')}**." + (
                         f" moe-lm's step is the mean of its runs before and after HF's "
                         f"({bracket[0]:.4f} s and {bracket[1]:.4f} s)." if bracket else ""))
    params = {label: r["params"] for label, r, _ in rows if _ok(r) and r.get("params")}
    if len(set(params.values())) > 1:
        lines.append(f"\nWARNING: parameter counts differ, so the shapes are not identical: {params}.")
    if report.get("routers"):
        lines += ["", f"## moe-lm routers at this shape (vs {BASELINE_ROUTER})", "",
                  "Each router against the mean of the softmax_topk runs just before and just after it.", "",
                  "| router | step (s) | softmax_topk around it (s) | vs softmax_topk | tokens/s | MFU | peak mem "
                  "(GiB) |",
                  "|---|---|---|---|---|---|---|"]
        for router, r in report["routers"].items():
            if not _ok(r):
                lines.append(f"| {router} | failed: {r.get('error')} | | | | | |")
                continue
            lines.append(f"| {router} | {r['step_s']:.4f} | {fmt(r.get('baseline_step_s'), '.4f')} | "
                         f"{fmt(r.get('step_ratio'), '.2f', 'x')} | "
                         f"{r['tokens_per_s']:,.0f} | {fmt(r.get('mfu'), '.2%')} | {r['peak_mem_gib']:.2f} |")
    v = report["versions"]
    lines += ["", f"Device {report['device']}; torch {v['torch']}, transformers {v['transformers']}, deepspeed "
              f"{v['deepspeed']}; {report.get('threads', '?')} torch threads; {report['date']}.",
              f"MFU: {fmt(report.get('flops_per_token'), ',.0f')} FLOPs/token (moe-lm `count_parameters`, both "
              f"sides) over {fmt(report.get('peak_flops'), '.3g')} FLOP/s, {report.get('peak_flops_source')}. "
              "Peak memory: CUDA max allocated over the timed steps, or on CPU the process's peak RSS.",
              f"moe-lm overrides on {BASE_RECIPE}: `{' '.join(report['moe_lm_overrides'])}`."]
    return "\n".join(lines) + "\n"


def finish(report: dict, out: Path) -> None:
    """Fill the derived fields (MFU, ratios) from whatever has run, then write peer.json and peer.md."""
    flops, peak = report.get("flops_per_token"), report.get("peak_flops")
    results = [report["moe_lm"], *report["hf"].values(), *report["routers"].values()]
    for r in results:
        if _ok(r) and flops and peak:
            r["mfu"] = r["tokens_per_s"] * flops / peak
    hf_ok = {impl: r for impl, r in report["hf"].items() if _ok(r)}
    if hf_ok:
        report["hf_best"] = max(hf_ok, key=lambda impl: hf_ok[impl]["tokens_per_s"])
    if hf_ok and _ok(report["moe_lm"]):
        report["ratio"] = report["moe_lm"]["tokens_per_s"] / hf_ok[report["hf_best"]]["tokens_per_s"]
    for r in report["routers"].values():
        if _ok(r) and r.get("baseline_step_s"):
            r["step_ratio"] = r["step_s"] / r["baseline_step_s"]
    threads = [r["threads"] for r in results if _ok(r)]
    report["threads"] = threads[0] if threads else None
    (out / "peer.json").write_text(json.dumps(report, indent=2))
    (out / "peer.md").write_text(render(report))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    from moe_lm.config import load_config
    from moe_lm.metrics.throughput import peak_flops
    from moe_lm.model.transformer import count_parameters
    from moe_lm.routers import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in SHAPE_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data-dir", default="data/stdlib", help="prepared data (made by the trainer if missing)")
    parser.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm"],
                        help="HF experts implementations (config._experts_implementation)")
    parser.add_argument("--routers", nargs="*", default=sorted(REGISTRY),
                        help="moe-lm routers compared with softmax_topk (none: skip)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is stopped")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 3 steps of each run: OUT/logs/<run>.profile.txt (op table by input shape)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the moe-lm side")
    args = parser.parse_args()
    unknown = [r for r in args.routers if r not in REGISTRY]
    if unknown:
        parser.error(f"unknown routers {unknown}; registered: {sorted(REGISTRY)}")
    args.out.mkdir(parents=True, exist_ok=True)

    shape = {key: getattr(args, key) for key in SHAPE_DEFAULTS}
    total_steps = args.warmup + args.steps

    def moe_lm_spec(router: str) -> dict:
        overrides = moe_lm_overrides(shape, args.data_dir, args.lr, total_steps, args.out / "runs" / router)
        overrides += [f"model.moe.router.name={router}", *args.overrides]
        return {"side": "moe-lm", "recipe": router_recipe(router), "overrides": overrides,
                "warmup": args.warmup, "steps": args.steps, "profile": args.profile}

    base = moe_lm_spec(BASELINE_ROUTER)
    cfg = load_config(base["recipe"], base["overrides"])  # fails here, before any run, on a bad override
    report = {"shape": shape, "warmup": args.warmup, "steps": args.steps, "lr": args.lr, "device": device_name(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {p: version(p) for p in ("torch", "transformers", "deepspeed")},
              "moe_lm_overrides": base["overrides"], "flops_per_token": count_parameters(cfg.model).flops_per_token,
              "moe_lm": None, "hf": {}, "routers": {}, "baseline_runs": []}

    def run_baseline() -> dict:
        report["baseline_runs"].append(launch(f"moe_lm_{BASELINE_ROUTER}_{len(report['baseline_runs'])}", base,
                                              args.out, args.timeout))
        return report["baseline_runs"][-1]

    first = run_baseline()
    for impl in args.hf_experts:
        spec = {"side": "hf", "shape": shape, "experts": impl, "lr": args.lr, "grad_clip": cfg.train.grad_clip,
                "warmup": args.warmup, "steps": args.steps, "profile": args.profile}
        report["hf"][impl] = launch(f"hf_{impl}", spec, args.out, args.timeout)
    report["moe_lm"] = bracketed(first, run_baseline())
    finish(report, args.out)
    for router in sorted(args.routers, key=lambda name: name != BASELINE_ROUTER):  # the baseline first
        if router == BASELINE_ROUTER:
            report["routers"][router] = {**report["moe_lm"], "baseline_step_s": report["moe_lm"]["step_s"]}
            continue
        before = report["baseline_runs"][-1]
        result = launch(f"moe_lm_{router}", moe_lm_spec(router), args.out, args.timeout)
        baseline = bracketed(before, run_baseline())
        report["routers"][router] = {**result, "baseline_step_s": baseline.get("step_s")}
        finish(report, args.out)

    # after the runs: on CPU the peak is a matmul probe that the runs must not share the cores with
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    report["peak_flops"], report["peak_flops_source"] = peak_flops(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    finish(report, args.out)
    print((args.out / "peer.md").read_text())


if __name__ == "__main__":
    main()
