"""Data preparation at two corpus sizes: tokenization throughput, peak memory, and what the end of a run costs.

    python scripts/prepare_benchmark.py --sizes-mb 100 400 --out runs/prepare_benchmark
    python scripts/prepare_benchmark.py --sizes-mb 5 20 --num-proc 1 2 --one-thread --out /tmp/prep_bench   # quick

For each size, a corpus of local .txt files is written (copies of the standard library's .py files, each with a
header that makes it unique, so deduplication keeps every one), and one tokenizer, trained once on a 4 MB sample,
serves every run. Each preparation runs in a fresh process (`prepare_data` with `data.num_proc` = N, or with the
Rust tokenizer held to one thread for `--one-thread`), and reports:
- tokens_per_s: tokens written (train + val) over the time spent in the shards (reading, hashing, tokenizing,
  writing), the part that grows with the corpus;
- peak_rss_mib: the peak resident memory of the main process, and of the largest tokenizer worker;
- wall_s: the whole preparation, index included.
Then, on each prepared folder, the end of a run: `TrainingData.unigram_perplexity` on the same number of
validation samples (the baseline from stored token counts, `end_of_run_s`), and for contrast the pass over every
training token that it replaces (`full_pass_s`).

Writes OUT/prepare_benchmark.json and OUT/prepare_benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CORPUS_SEED_FILES = 1800  # stdlib files cycled through to build a corpus
TOKENIZER_SAMPLE_BYTES = 4 << 20
VAL_SAMPLES = 64  # validation samples of seq_len 256 scored at the end of a run


def build_corpus(folder: Path, size_bytes: int) -> int:
    """Text files under `folder` adding up to about `size_bytes`, each unique; returns the bytes written."""
    from moe_lm.data.corpus import stdlib_files

    if folder.exists() and (folder / ".complete").is_file():
        return int((folder / ".complete").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    sources = [p for p in stdlib_files()[:CORPUS_SEED_FILES] if 0 < p.stat().st_size < 1 << 20]
    written, copy = 0, 0
    while written < size_bytes:
        for source in sources:
            text = source.read_text(errors="replace")
            body = f"# copy {copy} of {source.name}\n{text}"
            path = folder / f"{copy // 1000:04d}" / f"{copy:07d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written += len(body.encode())
            copy += 1
            if written >= size_bytes:
                break
    (folder / ".complete").write_text(str(written))
    return written


def train_shared_tokenizer(corpus: Path, out: Path, vocab_size: int) -> Path:
    from moe_lm.config.schema import DataConfig
    from moe_lm.data.shards import plan_shards, tokenizer_sample
    from moe_lm.data.tokenizer import train_tokenizer

    if not out.is_dir():
        cfg = DataConfig(sources=[str(corpus)], tokenizer_sample_bytes=TOKENIZER_SAMPLE_BYTES)
        train_tokenizer(tokenizer_sample(cfg, plan_shards(cfg)), vocab_size, out)
    return out


def own_peak_rss_kib() -> int:
    """Peak resident memory of this process since it started, in KiB: Linux's VmHWM of its own address space.

    Not `ru_maxrss`: Linux carries it over exec from the process that forked this one, so a child would report the
    benchmark parent's peak (which holds a whole corpus's tokens after the end-of-run pass) as its own."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; elsewhere only an upper bound


def child(args: argparse.Namespace) -> None:
    """One preparation in this fresh process; prints its figures as JSON."""
    if args.one_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust tokenizer encodes a batch on one thread
    from moe_lm.config.schema import DataConfig
    from moe_lm.data.prepare import load_meta, prepare_data

    cfg = DataConfig(sources=[args.corpus], dir=args.data_dir, tokenizer=args.tokenizer, num_proc=args.num_proc[0],
                     val_fraction=0.02, shard_bytes=args.shard_mb << 20)
    started = time.perf_counter()
    prepare_data(cfg, progress=False)
    wall = time.perf_counter() - started
    meta = load_meta(args.data_dir)
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    print(json.dumps({"tokens": tokens, "bytes": meta["bytes"], "shards": meta["shards"], "wall_s": round(wall, 2),
                      "shards_s": meta["seconds"]["shards"], "index_s": meta["seconds"]["index"],
                      "tokens_per_s": round(tokens / meta["seconds"]["shards"]),
                      "peak_rss_mib": round(own_peak_rss_kib() / 1024),
                      "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}))


def end_of_run(data_dir: Path) -> dict:
    """The unigram baseline the trainer computes at the end of a run, timed, and the full pass it replaces."""
    import numpy as np

    from moe_lm.config.schema import DataConfig
    from moe_lm.data.prepare import unigram_perplexity
    from moe_lm.data.training import open_training_data

    data = open_training_data(DataConfig(dir=str(data_dir)), seq_len=256, seed=0)
    batches = data.validation_batches(VAL_SAMPLES // 8, 8)
    started = time.perf_counter()
    from_counts = data.unigram_perplexity(batches)
    counts_s = time.perf_counter() - started
    started = time.perf_counter()
    stream = data.train.token_file
    full = unigram_perplexity(np.asarray(stream.tokens(0, stream.num_tokens)), data.validation_targets(batches),
                              data.vocab_size)
    full_s = time.perf_counter() - started
    assert abs(full - from_counts) < 1e-6 * full, (full, from_counts)
    return {"end_of_run_s": round(counts_s, 4), "full_pass_s": round(full_s, 3), "unigram_ppl": round(from_counts, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values to run")
    parser.add_argument("--one-thread", action="store_true", help="also run num_proc 1 with the tokenizer on 1 thread")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--shard-mb", type=int, default=64, help="data.shard_bytes in MiB")
    parser.add_argument("--work", default=None, help="corpora and prepared folders (default OUT/work)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    variants = [(n, False) for n in args.num_proc] + ([(1, True)] if args.one_thread else [])
    tokenizer = None
    for size in args.sizes_mb:
        corpus = work / f"corpus_{size}mb"
        corpus_bytes = build_corpus(corpus, size << 20)
        tokenizer = tokenizer or train_shared_tokenizer(corpus, work / "tokenizer", args.vocab_size)
        for num_proc, one_thread in variants:
            label = f"{num_proc} process{'es' if num_proc > 1 else ''}" + (", 1 thread" if one_thread else "")
            data_dir = work / f"data_{size}mb_{num_proc}{'_1thread' if one_thread else ''}"
            shutil.rmtree(data_dir, ignore_errors=True)
            command = [sys.executable, __file__, "--child", "--out", str(out), "--corpus", str(corpus),
                       "--data-dir", str(data_dir), "--tokenizer", str(tokenizer), "--num-proc", str(num_proc),
                       "--shard-mb", str(args.shard_mb)] + (["--one-thread"] if one_thread else [])
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"preparation failed ({label}, {size} MB):\n{result.stderr}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            run = {"size_mb": size, "corpus_bytes": corpus_bytes, "variant": label, "num_proc": num_proc,
                   "one_thread": one_thread, **figures}
            if not one_thread and num_proc == args.num_proc[0]:
                run.update(end_of_run(data_dir))
            runs.append(run)
            print(json.dumps(run), flush=True)
    report = summarize(runs, args.sizes_mb)
    (out / "prepare_benchmark.json").write_text(json.dumps({"runs": runs, "summary": report}, indent=2) + "\n")
    (out / "prepare_benchmark.md").write_text(markdown(runs, report))
    print((out / "prepare_benchmark.md").read_text())


def summarize(runs: list[dict], sizes: list[int]) -> dict:
    """The acceptance figures: memory growth and end-of-run growth from the smallest to the largest size."""
    small, large = min(sizes), max(sizes)
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        by_size = {r["size_mb"]: r for r in runs if r["variant"] == variant}
        summary[variant] = {"rss_ratio": round(by_size[large]["peak_rss_mib"] / by_size[small]["peak_rss_mib"], 3),
                            "worker_rss_ratio": (round(by_size[large]["worker_peak_rss_mib"]
                                                       / by_size[small]["worker_peak_rss_mib"], 3)
                                                 if by_size[small]["worker_peak_rss_mib"] else None)}
    with_end = {r["size_mb"]: r for r in runs if "end_of_run_s" in r}
    summary["end_of_run_extra_s"] = round(with_end[large]["end_of_run_s"] - with_end[small]["end_of_run_s"], 4)
    summary["full_pass_extra_s"] = round(with_end[large]["full_pass_s"] - with_end[small]["full_pass_s"], 3)
    return summary


def markdown(runs: list[dict], summary: dict) -> str:
    lines = ["# Data preparation benchmark", "",
             f"{os.cpu_count()} CPUs. Tokens/s over the shard phase; peak RSS of the main process and of the largest "
             "worker.", "",
             "| corpus | variant | tokens | shards | tokens/s | wall s | peak RSS MiB | worker RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['size_mb']} MB | {r['variant']} | {r['tokens']:,} | {r['shards']} | "
                     f"{r['tokens_per_s']:,} | {r['wall_s']} | {r['peak_rss_mib']} | {r['worker_peak_rss_mib']} |")
    lines += ["", "| corpus | end of run: unigram from counts, s | the full pass it replaces, s |", "|---|---|---|"]
    lines += [f"| {r['size_mb']} MB | {r['end_of_run_s']} | {r['full_pass_s']} |" for r in runs if "end_of_run_s" in r]
    lines += ["", "Peak RSS, largest / smallest corpus: " + ", ".join(
        f"{variant}: {s['rss_ratio']} (workers {s['worker_rss_ratio']})"
        for variant, s in summary.items() if isinstance(s, dict)),
        f"End of run, extra seconds on the largest corpus: {summary['end_of_run_extra_s']} "
        f"(the full pass: {summary['full_pass_extra_s']})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
