"""`moe-lm`: the command line. Every command that takes a recipe also takes `key=value` overrides.

    moe-lm prepare-data recipes/quickstart.yaml
    moe-lm train recipes/quickstart.yaml train.max_steps=100 model.moe.router.name=mpi
    moe-lm train recipes/quickstart.yaml train.resume=auto        # continue from the newest complete checkpoint
    moe-lm export runs/quickstart --hf exports/quickstart       # a transformers folder (AutoModelForCausalLM)
    moe-lm generate runs/quickstart --prompt "def main("
    moe-lm eval runs/quickstart                                   # validation perplexity -> RUN_DIR/eval.json
    moe-lm eval runs/quickstart_grmoe --sweep --baseline runs/quickstart  # alpha/tau sweep vs temperature
    moe-lm info recipes/350m_e8.yaml --gpus 8                     # parameters, FLOPs, memory per GPU
    moe-lm config recipes/quickstart.yaml model.moe.top_k=1       # the resolved recipe
    moe-lm compare runs/a runs/b --out runs/compare
"""

from __future__ import annotations

import argparse
import sys

from moe_lm.config import ConfigError, load_config

# Exit statuses (README "Exit codes"); argparse exits 2 on a usage error.
EXIT_ERROR = 1  # a user or config error, printed as one line "moe-lm: ..."
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after checkpointing; rerun with train.resume=auto
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C: checkpointed (first SIGINT) or aborted (second)


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from moe_lm.data import DataError, index_data, load_meta, parse_shard, prepare_shards, prepare_training_data

    cfg = load_config(args.recipe, args.overrides)
    try:
        if cfg.data.blend:  # folders prepared by their own recipes: check them
            folders = prepare_training_data(cfg.data, cfg.model.seq_len)
            print(f"a blend of {len(folders)} prepared folders, ready: {', '.join(map(str, folders))}")
            return
        if args.index:
            data_dir = index_data(cfg.data, cfg.model.seq_len)
        else:
            job, jobs = parse_shard(args.shard) if args.shard else (0, 1)
            data_dir = prepare_shards(cfg.data, job, jobs, cfg.model.seq_len)
            if data_dir is None:
                print(f"moe-lm: the shards of job {job}/{jobs} are prepared; the job that completes the last shard "
                      f"indexes them (or run: moe-lm prepare-data {args.recipe} ... --index)")
                return
    except DataError as exc:
        sys.exit(f"moe-lm: data error: {exc}")
    meta = load_meta(data_dir)
    _print_table(f"prepared {data_dir}", [(k, f"{v:,}" if isinstance(v, int) else str(v)) for k, v in meta.items()
                                           if not isinstance(v, (dict, list))])


def cmd_train(args: argparse.Namespace) -> None:
    from moe_lm.train.distributed import check_layout, init_distributed, resolve_env

    cfg = load_config(args.recipe, args.overrides)
    env = resolve_env()
    # before the data stack is imported: a bad layout ends every rank within seconds with the same message, and
    # an unreachable master within parallel.init_timeout_s; the Trainer then finds the process group ready
    check_layout(cfg.parallel, env.world_size, cfg.model.moe.num_experts)
    init_distributed(cfg.parallel, env)
    from moe_lm.checkpoint import CheckpointError
    from moe_lm.data import DataError
    from moe_lm.train import Trainer
    from moe_lm.train.faults import TrainingDiverged
    from moe_lm.train.run_dir import RunDirError

    try:
        trainer = Trainer(cfg, env)
        summary = trainer.train()
    except DataError as exc:
        sys.exit(f"moe-lm: {_rank_prefix()}data error: {exc}")
    except (CheckpointError, RunDirError, TrainingDiverged) as exc:  # the same message on every rank
        sys.exit(f"moe-lm: {exc}")
    if summary.get("interrupted"):  # the trainer printed where the checkpoint is
        sys.exit(EXIT_PREEMPTED if trainer.stop_cause == "preempted" else EXIT_INTERRUPTED)
    if trainer.is_main:
        _print_table(f"{cfg.run.name}: {cfg.run.dir}/summary.json", [
            ("router", summary["router"]),
            ("steps", f"{summary['steps']:,}"),
            ("tokens", f"{summary['tokens']:,}"),
            ("val loss", f"{summary['val_loss']:.4f}"),
            ("val ppl", f"{summary['val_ppl']:.2f}"),
            ("unigram ppl (same tokens)", f"{summary['unigram_ppl']:.2f}"),
            ("load CV (mean over layers)", f"{summary.get('moe/load_cv_mean', float('nan')):.3f}"),
            ("collapse rate", f"{summary.get('moe/collapse_rate', float('nan')):.3f}"),
            ("token routing entropy", f"{summary.get('moe/token_entropy', float('nan')):.3f}"),
            ("tokens/s", f"{summary.get('tokens_per_s', float('nan')):,.0f}"),
            ("MFU", f"{summary.get('mfu', float('nan')):.2%}"),
        ])


def cmd_info(args: argparse.Namespace) -> None:
    from moe_lm.model.memory import UNMODELLED_SHARE, estimate_memory
    from moe_lm.model.transformer import count_parameters
    from moe_lm.train.distributed import check_layout

    cfg = load_config(args.recipe, args.overrides)
    gpus = cfg.parallel.ep_size if args.gpus is None else args.gpus
    if gpus < 1:
        sys.exit(f"moe-lm: --gpus must be >= 1, got {gpus}")
    check_layout(cfg.parallel, gpus, cfg.model.moe.num_experts)
    counts = count_parameters(cfg.model)
    m, t = cfg.model, cfg.train
    _print_table(f"{args.recipe}", [
        ("layers x width x heads", f"{m.n_layers} x {m.d_model} x {m.n_heads}"),
        ("experts / top-k / MoE every", f"{m.moe.num_experts} / {m.moe.top_k} / {m.moe.layer_freq} layer(s)"),
        ("router", m.moe.router.name),
        ("base (dense) parameters", f"{counts.base:,}"),
        ("total parameters (all experts)", f"{counts.total:,}"),
        ("active parameters per token", f"{counts.active:,}"),
        ("parameters per expert", f"{counts.per_expert:,}"),
        ("training FLOPs per token", f"{counts.flops_per_token:.3e}"),
    ])
    bf16 = t.precision != "fp32"  # auto is bf16 on the GPUs this plans for
    est = estimate_memory(cfg, gpus, bf16)
    act = est.activations
    budget = args.gpu_mem_gib * 2 ** 30
    usable = (1 - UNMODELLED_SHARE) * budget

    def gib(nbytes: float) -> str:
        return f"{nbytes / 2 ** 30:,.2f} GiB"

    verdict = (f"yes, {gib(usable - est.total)} to spare" if est.fits(budget)
               else f"no, {gib(est.total - usable)} over")
    _print_table(f"memory per GPU: {gpus} GPU(s), ep_size {cfg.parallel.ep_size}, ZeRO-{cfg.parallel.zero_stage}, "
                 f"{'bf16' if bf16 else 'fp32'}, micro-batch {t.micro_batch_size} x {m.seq_len} tokens, "
                 f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}", [
        ("parameters (dense + this GPU's experts)", f"{est.dense_params:,} + {est.expert_params:,}"),
        ("weights", gib(est.weights)),
        ("gradients", gib(est.gradients)),
        ("optimizer states" + (" (fp32 master + Adam)" if bf16 else " (Adam)"), gib(est.optimizer_states)),
        ("activations: blocks", gib(act.layers)),
        ("activations: final norm + fused loss", gib(act.head + act.loss_chunk)),
        ("total", gib(est.total)),
        (f"fits in {args.gpu_mem_gib:g} GiB ({UNMODELLED_SHARE:.0%} kept free)", verdict),
    ])


def cmd_compare(args: argparse.Namespace) -> None:
    from moe_lm.metrics.compare import NotARunError, compare_runs

    try:
        report = compare_runs(args.runs, args.out)
    except NotARunError as exc:
        sys.exit(f"moe-lm: {exc}")
    print(report.read_text())
    print(f"wrote {report} and plots in {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from moe_lm.checkpoint import CheckpointError, export_checkpoint
    from moe_lm.export.hf import ExportError, export_hf
    from moe_lm.train.run_dir import RunDirError, check_checkpoint_source

    if (args.out is None) == (args.hf is None):
        sys.exit("moe-lm: export: give --out FILE (one safetensors file) or --hf DIR (a transformers folder)")
    try:
        check_checkpoint_source(args.checkpoint)
        if args.hf is None:
            print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
            return
        result = export_hf(args.checkpoint, args.hf, args.layout, args.tokenizer)
    except (CheckpointError, RunDirError, ExportError) as exc:
        sys.exit(f"moe-lm: export: {exc}")
    if result.layout == "mixtral":
        print(f"wrote {result.path}: MixtralForCausalLM, loads with AutoModelForCausalLM.from_pretrained")
    else:
        print(f"wrote {result.path}: moe-lm modeling code, loads with AutoModelForCausalLM.from_pretrained(..., "
              f"trust_remote_code=True) (not a Mixtral: {'; '.join(result.not_mixtral)})")


def cmd_generate(args: argparse.Namespace) -> None:
    from moe_lm.checkpoint import CheckpointError
    from moe_lm.export.hf import ExportError
    from moe_lm.generate import generate, is_hf_folder
    from moe_lm.train.run_dir import RunDirError, check_checkpoint_source

    try:
        if not is_hf_folder(args.source):
            check_checkpoint_source(args.source)
        generate(args.source, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                 tokenizer=args.tokenizer)
    except (CheckpointError, RunDirError, ExportError, ValueError) as exc:
        sys.exit(f"moe-lm: generate: {exc}")


def cmd_eval(args: argparse.Namespace) -> None:
    from moe_lm.checkpoint import CheckpointError, run_dir_of
    from moe_lm.eval.evaluate import evaluate
    from moe_lm.train.run_dir import RunDirError, check_checkpoint_source

    if args.baseline is not None and not args.sweep:
        sys.exit("moe-lm: eval: --baseline is an arm of --sweep; add --sweep")
    if args.text is not None and args.sweep:
        sys.exit("moe-lm: eval: --sweep evaluates the validation split; drop --text (or use --data-dir)")
    try:
        check_checkpoint_source(args.checkpoint)
        if args.sweep:
            from moe_lm.eval.sweep import sweep

            if args.baseline is not None:
                check_checkpoint_source(args.baseline)
            out = args.out or run_dir_of(args.checkpoint) / "sweep"
            sweep(args.checkpoint, args.alphas, args.taus, args.max_experts, args.samples or 256, out, args.data_dir,
                  args.dropless, args.baseline)
            print(f"wrote {out}/sweep.csv, sweep.json and ppl_vs_active_experts.png")
            return
        out = args.out or run_dir_of(args.checkpoint)
        report = evaluate(args.checkpoint, out, args.text, args.samples, args.data_dir, args.dropless)
    except (CheckpointError, RunDirError, ValueError) as exc:  # ValueError: DataError, a router without knobs
        sys.exit(f"moe-lm: eval: {exc}")
    _print_table(f"{report['router']} on {report['data']}: {out}/eval.json", [
        ("perplexity", f"{report['perplexity']:.3f}"), ("loss", f"{report['loss']:.4f}"),
        ("tokens", f"{report['tokens']:,}"), ("dropless", str(report["dropless"])),
        ("dropped assignments (capacity)", f"{report['drop_frac']:.2%}"),
        ("active experts per token", f"{report['active_experts']:.3f}"),
        ("token routing entropy", f"{report['token_entropy']:.3f}")])


def cmd_config(args: argparse.Namespace) -> None:
    from moe_lm.config import to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides)), end="")


def build_parser() -> argparse.ArgumentParser:
    from moe_lm.config.describe import RecipeHelpAction, version_string

    parser = argparse.ArgumentParser(prog="moe-lm", description="Mixture-of-Experts LM pretraining for router research")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in [("train", cmd_train, "train a recipe"),
                                  ("prepare-data", cmd_prepare_data, "tokenizer + token files for a recipe's data"),
                                  ("info", cmd_info, "parameter and FLOP counts and memory per GPU of a recipe "
                                                     "(nothing allocated)"),
                                  ("config", cmd_config, "print the resolved recipe as YAML (includes, overrides and "
                                                         "defaults merged)")]:
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("-h", "--help", action=RecipeHelpAction,
                       help="show this help and every recipe key with its type, default and meaning")
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides")
        p.set_defaults(func=func)
        if func is cmd_prepare_data:
            step = p.add_mutually_exclusive_group()
            step.add_argument("--shard", metavar="I/N", default=None,
                              help="prepare only the shards of job I of N (I from 0), e.g. one job per machine; the "
                                   "job that completes the last shard indexes them")
            step.add_argument("--index", action="store_true",
                              help="only index the shards that --shard jobs prepared (names any that are missing)")
        if func is cmd_info:
            p.add_argument("--gpus", type=int, default=None,
                           help="GPUs to plan memory for (default: parallel.ep_size, the fewest that can run it)")
            p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p = sub.add_parser("compare", help="table and plots comparing finished runs")
    p.add_argument("runs", nargs="+", help="run directories, or wandb run paths entity/project/run_id (online runs)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("export", help="a checkpoint as one safetensors file (--out) or a transformers folder (--hf)")
    p.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step_N), or a run or checkpoints "
                                      "directory for its newest complete checkpoint")
    p.add_argument("--out", default=None, help="output file, e.g. model.safetensors (experts by global id)")
    p.add_argument("--hf", default=None, metavar="OUT_DIR",
                   help="output folder that transformers' AutoModelForCausalLM and AutoTokenizer load "
                        "(docs/after-training.md)")
    p.add_argument("--layout", choices=["auto", "mixtral", "moe_lm"], default="auto",
                   help="with --hf: mixtral (MixtralForCausalLM, no remote code), moe_lm (its own modeling code, "
                        "trust_remote_code=True) or auto (mixtral when the recipe fits)")
    p.add_argument("--tokenizer", default=None,
                   help="with --hf: tokenizer folder (default: the run's data.dir/tokenizer)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("generate", help="stream text from a run (through its transformers export) or an --hf export")
    p.add_argument("source", help="a run, checkpoints or step_N folder, or a folder written by export --hf")
    p.add_argument("--prompt", required=True, help="text the model continues")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a run (default: its data.dir/tokenizer)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("eval", help="perplexity of a checkpoint (any router), or --sweep of its post-hoc routing knobs")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("--out", default=None, help="output directory (default: the run directory for eval.json, "
                                               "RUN_DIR/sweep for --sweep)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on instead of the validation split")
    p.add_argument("--dropless", action="store_true",
                   help="no expert capacity limit (as the transformers export); without it --sweep runs at the "
                        "training capacity factor")
    p.add_argument("--samples", type=int, default=None,
                   help="sequences to evaluate (default: all; with --sweep: 256 per setting)")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the checkpoint's data.dir)")
    p.add_argument("--sweep", action="store_true",
                   help="sweep the post-hoc knobs alpha and tau of grmoe, softmax_topk or mpi (sweep.csv, sweep.json, "
                        "plot; docs/after-training.md)")
    p.add_argument("--baseline", default=None, metavar="CHECKPOINT",
                   help="with --sweep: a second run swept the same way (e.g. softmax_topk: alpha = 1/temperature), "
                        "in the same table and plot")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16],
                   help="with --sweep: sharpness values (grmoe's concentration, 1/temperature for softmax routers); "
                        "the trained one is always added")
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.8, 0.9],
                   help="with --sweep: mass thresholds of the dispatch; 0 (top-k) is always added")
    p.add_argument("--max-experts", type=int, default=None,
                   help="with --sweep: k_max, the most experts threshold dispatch gives a token, 1..E (default E)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the environment anyway.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    from moe_lm.train.distributed import DistributedInitError

    try:
        args.func(args)
    except ConfigError as exc:
        sys.exit(f"moe-lm: {_rank_prefix()}config error: {exc}")
    except DistributedInitError as exc:
        sys.exit(f"moe-lm: distributed launch error: {exc}")
    except KeyboardInterrupt as exc:  # Ctrl-C outside the training loop, or a second one inside (SecondInterrupt)
        print(f"moe-lm: {_rank_prefix()}{str(exc) or 'interrupted'}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def _rank_prefix() -> str:
    """ "rank 1/2: " under a launcher, so that the interleaved messages of several ranks can be told apart."""
    import os

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID") if "SLURM_STEP_NUM_TASKS" in os.environ else None)
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS"))
    return f"rank {rank}/{world}: " if rank is not None and world is not None else ""


if __name__ == "__main__":
    main()
