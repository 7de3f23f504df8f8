#!/usr/bin/env bash
# The GPU check: the three 350m_e8 recipes and the peer benchmark against HF Mixtral, under ~8 minutes on one H200.
#   cp -r ../shared/gpu .gpu && echo /.gpu/ >> .git/info/exclude   # once: the kit, for its wheels (.gpu/wheels)
#   SMALL=1 bash scripts/gpu_check.sh                               # dry run first: the same steps, toy sizes, CPU
#   bash scripts/gpu_check.sh                                       # on the GPU machine, from the project root
# Steps: install the wheels the GPU image lacks (into /tmp/site), prepare a 20 MB stdlib corpus, run
# scripts/peer_benchmark.py at the GPU peer shape (softmax_topk, grmoe, mpi), then train each 350m_e8 recipe 30 steps.
# Four files land in $OUT (default /tmp/gpuout; the device tool brings back at most 8): summary.md (all results),
# results.jsonl (one line per recipe: the last logged interval's tokens/s, MFU and peak memory, as the trainer logs
# them, and over the second half of the steps), peer.json, and report.tar.gz with everything else: the logs, and op
# tables with the GPU's busy share (peer/logs/*.profile.txt for each peer run, logs/<recipe>.profile.txt for each
# 350m_e8 recipe: 3 steps profiled after the 30 measured ones, so the profiler cannot slow a measured interval).
# Each step has a timeout, and the whole stays within BUDGET_S seconds (default 460): steps that would start past
# it are skipped and say so. Runs and data go to $WORK (default /dev/shm/moe_lm_gpu_check; removed first).
# A shorter check: PEER=0 skips the peer benchmark; RUNS lists the recipe runs, each a recipe name with overrides
# joined by '+' (RUNS="350m_e8 350m_e8+train.compile=true"); LOG_INTERVAL sets the trainer's (default 10, 1 with SMALL=1);
# PROFILE=0 profiles no recipe run; SYNC_PROBE=1 also lists each place that synchronises the GPU with the host in one training step of a 4-layer
# 350m_e8 (torch.cuda.set_sync_debug_mode; logs/sync_probe.txt in the tarball).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
R=$PWD; SMALL=${SMALL:-0}; OUT=${OUT:-/tmp/gpuout}; BUDGET_S=${BUDGET_S:-460}; PY=${PYTHON:-python3}
RUNS=${RUNS:-350m_e8 350m_e8_mpi 350m_e8_grmoe}; PEER_RUN=${PEER:-1}
SYNC_PROBE=${SYNC_PROBE:-0}
W=${WORK:-/dev/shm/moe_lm_gpu_check}; rm -rf "$W"; O=$W/report; mkdir -p "$O/logs" "$OUT" || exit 1
pack() {  # the report's four files into $OUT, also when the budget's timeout or a signal ends the script early
  cp "$O"/summary.md "$O"/results.jsonl "$OUT"/ 2>/dev/null; cp "$W"/peer/peer.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/report.tar.gz" -C "$O" .
}
trap pack EXIT
[ -f recipes/350m_e8.yaml ] || { echo "run from the project root"; exit 1; }

if [ "$SMALL" = 0 ]; then
  WHEELS=${WHEELS:-$R/.gpu/wheels}
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$R
  else
    echo "no wheels in $WHEELS: using the installed packages"; export PYTHONPATH=$R
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "C compiler (torch.compile's triton needs one): $(command -v cc gcc | head -n 1)"
  MAXB=20000000; STEPS=30; MB=8; TOY=(); PROF_STEPS=3; LOG_INTERVAL=${LOG_INTERVAL:-10}
  # the routers issue 10 sets targets for; HF's grouped_mm experts ran at 0.54x-0.58x its eager ones in both H200
  # runs that measured them (docs/performance.md): eager alone, HF's best there, keeps the peer runs inside 300 s
  PEER=(--layers 8 --d 1024 --heads 16 --experts 8 --topk 2 --ffn 2816 --vocab 50304 --seq 2048 --batch 8
        --warmup 3 --steps 10 --timeout 120 --routers softmax_topk grmoe mpi --hf-experts eager)
else  # toy sizes on CPU: checks that every step runs, not its speed
  export PYTHONPATH=$R DS_ACCELERATOR=cpu
  MAXB=2000000; STEPS=3; MB=2; PROF_STEPS=1; LOG_INTERVAL=${LOG_INTERVAL:-1}
  TOY=(model.d_model=64 model.n_heads=2 model.d_ff=128 model.seq_len=64 model.vocab_size=1024)
  PEER=(--layers 2 --d 64 --heads 2 --experts 8 --topk 2 --ffn 128 --vocab 1024 --seq 64 --batch 2
        --warmup 1 --steps 2 --timeout 120)
fi
# the profiled steps follow the measured ones, and one more step follows them (the last step logs and evaluates);
# PROFILE=0: no op tables from the recipe runs
PROF=(train.profile_start=$((STEPS + 1)) train.profile_steps=$PROF_STEPS); TRAIN_STEPS=$((STEPS + PROF_STEPS + 1))
[ "${PROFILE:-1}" = 1 ] || { PROF=(); TRAIN_STEPS=$STEPS; }
$PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 1 \
  | tee "$O/versions.txt"

cap() {  # cap SECONDS: that, or what is left of the budget if less
  local left=$((BUDGET_S - SECONDS)); echo $(($1 < left ? $1 : left))
}
DATA=(data.sources=[stdlib] data.dir=$W/data data.vocab_size=1024 data.max_bytes=$MAXB)

t0=$SECONDS
timeout "$(cap 150)" $PY -m moe_lm.cli prepare-data recipes/quickstart.yaml "${DATA[@]}" > "$O/logs/prepare.log" 2>&1
echo "prepare-data: exit $? in $((SECONDS - t0)) s" | tee "$O/prepare.txt"

# the peer benchmark: moe-lm against HF Mixtral at one shape, and every router against softmax_topk
t0=$SECONDS; limit=$(cap 300)
if [ "$PEER_RUN" = 0 ]; then
  echo "peer benchmark: not run (PEER=0)"
elif [ "$limit" -ge 60 ]; then
  timeout "$limit" $PY scripts/peer_benchmark.py "${PEER[@]}" --profile --data-dir "$W/data" --out "$W/peer" -- \
    "${DATA[@]}" > "$O/logs/peer_benchmark.log" 2>&1
  echo "peer benchmark: exit $? in $((SECONDS - t0)) s (limit $limit s)"
  # only the report, the op tables and the worker logs come back: the run directories stay in $W
  mkdir -p "$O/peer/logs"
  cp "$W"/peer/peer.{json,md} "$O/peer/" 2>/dev/null
  cp "$W"/peer/logs/*.{profile.txt,log} "$O/peer/logs/" 2>/dev/null
else
  echo "peer benchmark: skipped, $limit s of the budget left"
fi

# each 350m_e8 recipe through the CLI (the real training loop: eval, logging, the end-of-run checkpoint)
run_recipe() {  # run_recipe NAME RECIPE [OVERRIDE ...]: one line of results.jsonl
  local name=$1 recipe=$2 t0=$SECONDS limit rc; shift 2; limit=$(cap 140)
  if [ "$limit" -lt 45 ]; then
    echo "{\"run\": \"$name\", \"skipped\": \"$limit s of the budget left\"}" | tee -a "$O/results.jsonl"; return
  fi
  timeout "$limit" $PY -m moe_lm.cli train "$recipe" "${DATA[@]}" train.max_steps=$TRAIN_STEPS train.micro_batch_size=$MB \
    train.grad_accum_steps=1 train.warmup_steps=5 train.eval_interval=100000 train.eval_batches=2 \
    train.log_interval=$LOG_INTERVAL train.checkpoint_verify=size wandb.mode=disabled run.dir="$W/runs/$name" \
    "${PROF[@]}" "${TOY[@]}" "$@" > "$O/logs/$name.log" 2>&1
  rc=$?
  cp "$W/runs/$name"/profile/*_rank0.txt "$O/logs/$name.profile.txt" 2>/dev/null  # op tables of 3 training steps
  $PY - "$W/runs/$name" "$name" "$recipe" "$rc" "$((SECONDS - t0))" "$STEPS" "$O/logs/$name.profile.txt" <<'PY' \
    | tee -a "$O/results.jsonl"
import json, os, re, sys
run_dir, name, recipe, rc, wall, steps, profile = sys.argv[1:8]
steps = int(steps)
rows = []  # the logged intervals of the measured steps: (last step, tokens/s, step time, row)
if os.path.exists(f"{run_dir}/metrics.jsonl"):
    for line in open(f"{run_dir}/metrics.jsonl"):
        row = json.loads(line)
        if "perf/tokens_per_s" in row and row["step"] <= steps:
            rows.append(row)
last = rows[-1] if rows else {}
# the second half: total tokens over total time of the intervals that start after step steps/2
tokens = seconds = 0.0
late_from = None
for before, row in zip([{"step": 0}] + rows, rows):
    if before["step"] >= steps // 2:
        late_from = late_from or before["step"] + 1
        interval_s = (row["step"] - before["step"]) * row["perf/step_time_s"]
        tokens, seconds = tokens + row["perf/tokens_per_s"] * interval_s, seconds + interval_s
gpu_ms = busy = ops = None  # from the op tables' header: "steps a-b, rank 0: W s of wall time ..., G s of GPU
# kernel time (..), N aten ops dispatched"
if os.path.exists(profile):
    line = open(profile).readline()
    first, end = map(int, re.match(r"steps (\d+)-(\d+)", line).groups())
    gpu = re.search(r"([\d.]+) s of wall time.*?([\d.]+) s of GPU kernel time", line)
    count = re.search(r"(\d+) aten ops dispatched", line)
    if gpu:
        gpu_ms, busy = 1e3 * float(gpu[2]) / (end - first + 1), float(gpu[2]) / float(gpu[1])
    if count:
        ops = int(count[1]) // (end - first + 1)
print(json.dumps({"run": name, "recipe": recipe, "exit": int(rc), "wall_s": int(wall), "step": last.get("step"),
                  "tokens_per_s": last.get("perf/tokens_per_s"), "step_time_s": last.get("perf/step_time_s"),
                  "mfu": last.get("perf/mfu"), "peak_mem_gib": last.get("perf/peak_mem_gib"),
                  "late_from_step": late_from, "tokens_per_s_late": tokens / seconds if seconds else None,
                  "mfu_late": (last.get("perf/mfu") or 0) * tokens / seconds / last["perf/tokens_per_s"]
                  if seconds and last else None,
                  "gpu_kernel_ms_per_step": gpu_ms, "gpu_busy_profiled": busy, "aten_ops_per_step": ops}))
PY
  [ "$rc" = 0 ] || tail -n 12 "$O/logs/$name.log"
  rm -rf "$W/runs/$name"  # the end-of-run checkpoint of 350m_e8 is ~13 GB
}
: > "$O/results.jsonl"
for run in $RUNS; do
  IFS=+ read -r -a parts <<< "$run"
  run_recipe "$(echo "$run" | tr '+=' '__')" "recipes/${parts[0]}.yaml" "${parts[@]:1}"
done

if [ "$SYNC_PROBE" = 1 ] && [ "$(cap 60)" -ge 45 ]; then
  timeout "$(cap 60)" $PY - "${DATA[@]}" "${TOY[@]}" train.micro_batch_size=$MB model.n_layers=4 \
    run.dir="$W/runs/sync_probe" wandb.mode=disabled > "$O/logs/sync_probe.txt" 2>&1 <<'PY'
import collections, sys, traceback, warnings
import torch
from moe_lm.config import load_config
from moe_lm.train import Trainer

trainer = Trainer(load_config("recipes/350m_e8.yaml", sys.argv[1:]), progress=False)
for _ in range(3):
    trainer._train_step(log=False)
sites = collections.Counter()
def record(message, *args, **kwargs):
    frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-6:]
    sites["".join(traceback.format_list(frames))] += 1
warnings.showwarning = record
warnings.simplefilter("always")
if torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
trainer._train_step(log=False)
torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
print(f"{sum(sites.values())} synchronising calls in one training step (not a logging step), by call site:")
for site, count in sites.most_common():
    print(f"\n--- {count}x\n{site}")
PY
  echo "sync probe: exit $?" | tee -a "$O/prepare.txt"
fi

$PY - "$O" "$SECONDS" "$STEPS" <<'PY' | tee "$O/summary.md"
import json, os, sys
out, total, steps = sys.argv[1:4]
def fmt(value, spec):
    return "–" if value is None else format(value, spec)
print(f"# GPU check ({open(f'{out}/versions.txt').read().strip()})\n")
print(open(f"{out}/prepare.txt").read().strip() + "\n")
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
half = f"steps {next((r['late_from_step'] for r in rows if r.get('late_from_step')), '?')}-{steps}"
print(f"| recipe ({steps} steps) | exit | wall (s) | tokens/s (last interval) | step (s) | MFU | tokens/s ({half}) | "
      f"MFU ({half}) | peak mem (GiB) | GPU kernel ms/step (profiled) | GPU busy (profiled) | aten ops/step |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "skipped" in r:
        print(f"| {r['run']} | skipped: {r['skipped']} | | | | | | | | | | |")
        continue
    print(f"| {r['run']} | {r['exit']} | {r['wall_s']} | {fmt(r['tokens_per_s'], ',.0f')} | "
          f"{fmt(r['step_time_s'], '.3f')} | {fmt(r['mfu'], '.2%')} | {fmt(r['tokens_per_s_late'], ',.0f')} | "
          f"{fmt(r['mfu_late'], '.2%')} | {fmt(r['peak_mem_gib'], '.1f')} | "
          f"{fmt(r['gpu_kernel_ms_per_step'], '.1f')} | {fmt(r['gpu_busy_profiled'], '.0%')} | "
          f"{fmt(r['aten_ops_per_step'], ',')} |")
peer = f"{out}/peer/peer.md"
print("\n" + (open(peer).read() if os.path.exists(peer) else "(no peer benchmark result: see logs/peer_benchmark.log)"))
print(f"\ntotal {total} s")
PY
