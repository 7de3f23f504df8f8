"""The training loop: recipe -> DeepSpeed engine -> steps, validation, metrics, summary.

One optimizer step: the global batch (micro_batch_size x grad_accum_steps x world_size sequences, in the
sampler's seeded order) is cut into this rank's micro-batches; each runs forward (LM loss + the routers'
weighted aux losses) and backward through the DeepSpeed engine, which reduces dense gradients over all
ranks and expert gradients over the expert-data-parallel group, clips and steps at the accumulation
boundary. The routing records of every MoE layer go to the routing tracker, reduced across ranks once per
step; routers then get their once-per-step hook (`post_step`, e.g. an expert-bias update).

Fault tolerance (docs/checkpoints.md): `train.resume` restores the newest complete checkpoint at start;
checkpoints (`moe_lm/checkpoint/`) are written every `train.save_interval` steps, at the end, and at the first step
boundary after SIGTERM/SIGUSR1 or a first SIGINT, after which the run exits; a second SIGINT aborts at once. A
step whose loss or gradient is NaN/inf is skipped on every rank (`faults.py`), and `train.max_bad_steps` of them
in a row stop the run. Rank 0 holds the run directory's lock (`run_dir.py`) from the start to the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe_lm import checkpoint as ckpt
from moe_lm.config import Config, ConfigError, to_dict, to_yaml
from moe_lm.config.schema import CUDA_GRAPH_MODES
from moe_lm.data import make_batch, open_training_data, prepare_training_data, rank_slice
from moe_lm.metrics import (RoutingTracker, ThroughputMeter, build_loggers, diagnostics_metrics, peak_flops,
                            read_wandb_id)
from moe_lm.model.transformer import MoETransformer, count_parameters
from moe_lm.moe.deepspeed_moe import routing_counts_only, stable_seed
from moe_lm.moe.engine import build_engine, expert_param_groups, grad_norm
from moe_lm.train.faults import SecondInterrupt, SkippableAdamW, StopSignals, TrainingDiverged, grads_finite
from moe_lm.train.host_memory import keep_freed_host_memory
from moe_lm.train.profiling import StepProfiler
from moe_lm.train.run_dir import claim_run_dir, newest_complete_checkpoint
from moe_lm.train.distributed import DistEnv, check_layout, init_distributed, resolve_env


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not norms or 1-D parameters (biases, concentrations); expert parameters in groups of their
    own (`expert_param_groups`)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "name": "decay", "weight_decay": weight_decay},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return expert_param_groups(groups)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None, progress: bool = True):
        self.cfg = cfg
        self.env = env or resolve_env()
        check_layout(cfg.parallel, self.env.world_size, cfg.model.moe.num_experts)
        self.device = init_distributed(cfg.parallel, self.env)
        if self.device.type == "cpu" and cfg.train.keep_freed_host_memory:
            keep_freed_host_memory()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.progress = progress and self.is_main
        # before anything else touches run.dir or the GPUs: a live run there refuses this one (run_dir.py)
        self.run_lock = claim_run_dir(self.run_dir, self.rank)
        if self.run_lock is not None:  # errors before train() release it at exit; train() releases it itself
            weakref.finalize(self, self.run_lock.release)

        if self.is_main:
            prepare_training_data(cfg.data, cfg.model.seq_len, progress=self.progress)  # data.dir, or data.blend
        dist.barrier()
        self.data = open_training_data(cfg.data, cfg.model.seq_len, cfg.train.seed)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} < the tokenizer's vocabulary "
                              f"{self.data.vocab_size} of the training data")
        self.train_data, self.sampler = self.data.train, self.data.sampler
        # fixed (source, sample ids) batches: a prefix of each source's validation split, wrapped if short
        self.val_batches = self.data.validation_batches(cfg.train.eval_batches, cfg.train.micro_batch_size * self.world)

        torch.manual_seed(cfg.train.seed)  # identical dense/router init on every rank
        ep_rank = self.rank % cfg.parallel.ep_size  # DeepSpeed's default topology: EP groups of consecutive ranks
        t = cfg.train
        model = MoETransformer(cfg.model, cfg.parallel.ep_size, ep_rank, t.seed, t.activation_checkpointing,
                               t.loss_chunk_tokens).to(self.device)
        if t.compile:
            model.compile_static_parts(mode=t.compile_mode)
        # CUDA graphs (reduce-overhead) reuse their output memory: each forward starts a new generation of them
        self.cuda_graphs = t.compile and t.compile_mode in CUDA_GRAPH_MODES
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        # torch's fused AdamW (one kernel for all parameters, CPU or CUDA; no DeepSpeed JIT build) that can skip a
        # non-finite step on every rank (faults.py)
        optimizer = SkippableAdamW(optimizer_param_groups(model, t.weight_decay), lr=t.lr,
                                   betas=(t.beta1, t.beta2), eps=t.eps, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        # ZeRO-0: the exact norm over all experts, as for 1 process, measured once for the NaN check and the clip
        self.engine, self.measure_grad_norm = build_engine(model, optimizer, scheduler, cfg, self.world, self.bf16)
        self.client_optimizer, self.scheduler = optimizer, scheduler
        self.model: MoETransformer = self.engine.module
        torch.manual_seed(stable_seed(cfg.train.seed, "train", self.rank))  # router noise (jitter, sampling)

        self.counts = count_parameters(cfg.model)
        self.tracker = RoutingTracker(len(self.model.moe_layers()), cfg.model.moe.num_experts,
                                      cfg.metrics.dead_expert_share, cfg.metrics.per_layer)
        peak, self.peak_source = peak_flops(self.device, torch.bfloat16 if self.bf16 else torch.float32)
        # one meter per logging interval, one for the whole run (the summary)
        self.meters = [ThroughputMeter(self.counts.flops_per_token, peak, self.world, self.device) for _ in range(2)]
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0  # steps skipped for a NaN/inf loss or gradient, in total
        self.bad_streak = 0  # ... in a row, up to the last step
        self.signals = StopSignals()  # active during train()
        self.stop_requested = False  # a stop signal reached some rank (all-reduced at each step boundary)
        self.stop_cause: str | None = None  # after a stop: "preempted" (SIGTERM/SIGUSR1) or "interrupted" (SIGINT)
        self.last_checkpoint: Path | None = None
        self.last_metrics: dict = {}
        self.tokens_per_s = 0.0  # of the last logging interval, for the progress bar
        try:
            # validate (and load) the checkpoint before writing config.yaml or starting a wandb run, so that a
            # refused resume leaves run.dir as it was
            resume_from = ckpt.find_checkpoint(cfg.train.resume, self.run_dir, verify=cfg.train.checkpoint_verify)
            if resume_from is not None:
                self._load_checkpoint(resume_from)
            rng = ckpt.rng_state()  # the resumed (or seeded) generators; wandb.init may draw from Python's
            if self.is_main:
                (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.loggers = build_loggers(cfg.wandb, self.run_dir, to_dict(cfg), self.rank,
                                         resume_id=read_wandb_id(self.run_dir) if resume_from else None)
            ckpt.set_rng_state(rng)
        except BaseException:
            self._release_run_dir()
            raise

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size(self.world) * self.cfg.model.seq_len

    def _train_step(self, log: bool = True) -> dict[str, float]:
        """One optimizer step. Everything stays on the device except the step-boundary flags (one host read per
        step); with `log`, the losses and routing metrics are reduced over ranks and read back (else {})."""
        t = self.cfg.train
        ids = rank_slice(self.sampler.global_batch(self.consumed_samples, t.global_batch_size(self.world)),
                         self.rank, self.world)
        sums = torch.zeros(2, device=self.device)  # lm loss, aux loss, summed over micro-batches
        needs_counts = self.model.needs_step_counts()
        counts_LE = None  # without `log`, the step's assignment counts (summed over micro-batches), if needed
        for micro in range(t.grad_accum_steps):
            batch_ids = ids[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size]
            inputs, targets = make_batch(self.train_data, batch_ids)
            self._mark_forward()
            with contextlib.nullcontext() if log else routing_counts_only():  # records only where they are logged
                _, lm_loss, aux_loss = self.engine(inputs.to(self.device, non_blocking=True),
                                                   targets.to(self.device, non_blocking=True))
            sums += torch.stack([lm_loss.detach().float(), aux_loss.detach().float()])
            if log:
                for layer, record in enumerate(self.model.routing_records()):
                    self.tracker.record(layer, record)
            elif needs_counts:
                micro_LE = self.model.routing_counts().double()
                counts_LE = micro_LE if counts_LE is None else counts_LE + micro_LE
            # backward even on a NaN/inf loss: every rank must run the same backward collectives
            self.engine.backward(lm_loss + aux_loss)
            if micro == t.grad_accum_steps - 1:  # before the optimizer step: skip it on every rank if any is bad
                self.client_optimizer.overflow = self._boundary_flags(sums)
            self.engine.step()
        bad = self.client_optimizer.overflow
        self.consumed_samples += t.global_batch_size(self.world)
        self.step += 1
        if log:
            self.tracker.reduce()
            if needs_counts:
                counts_LE = torch.stack([self.tracker.layer_counts(i) for i in range(self.tracker.num_moe_layers)])
        elif needs_counts:
            dist.all_reduce(counts_LE)  # the counts of every rank, as the tracker's reduction gives them
        if bad:
            self._count_bad_step()
        else:
            self.bad_streak = 0
            if needs_counts:
                self.model.after_step(list(counts_LE.unbind(0)))
        if not log:
            return {}
        metrics = self.tracker.compute()
        dist.all_reduce(sums)
        loss, aux = (sums / (t.grad_accum_steps * self.world)).tolist()
        metrics.update({"train/loss": loss, "train/aux_loss": aux, "train/ppl": math.exp(min(loss, 50.0)),
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm(self.engine),
                        "train/skipped_steps": self.skipped_steps, "tokens": self.step * self.tokens_per_step})
        return metrics

    def _boundary_flags(self, loss_sums: torch.Tensor) -> bool:
        """One all-reduce at the accumulation boundary, so every rank takes the same decisions: is this step bad
        (a NaN/inf loss or local gradient on any rank; returned), and did any rank get a stop signal (sets
        `stop_requested`, acted on at the end of the step). moe-lm's only host read in a training step; DeepSpeed's
        optimizer wrappers add a fixed few (tests/train/test_host_syncs.py). Under ZeRO-1/2 and in bf16 the
        wrappers take this verdict as their own overflow check (`moe_lm/moe/engine.py`)."""
        grads_ok = (torch.isfinite(self.measure_grad_norm()) if self.measure_grad_norm
                    else grads_finite(self.model.parameters()))
        local_bad = ~torch.isfinite(loss_sums).all() | ~grads_ok
        stop = torch.full((), float(self.signals.received is not None), device=self.device)
        flags = torch.stack([local_bad.float(), stop])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        verdict = int((flags[0] + 2 * flags[1]).item())  # both flags in one read
        self.stop_requested = self.stop_requested or bool(verdict & 2)
        return bool(verdict & 1)

    def _count_bad_step(self) -> None:
        """The step just skipped had a NaN/inf loss or gradient: count it, stop after `train.max_bad_steps` in a row."""
        self.skipped_steps += 1
        self.bad_streak += 1
        limit = self.cfg.train.max_bad_steps
        ckpt.log(f"step {self.step}: NaN/inf loss or gradient, optimizer step skipped "
                 f"({self.bad_streak} in a row; train.max_bad_steps={limit})")
        if self.bad_streak >= limit:
            last = (f"The last good checkpoint, {self.last_checkpoint}, is intact" if self.last_checkpoint
                    else "No checkpoint was saved")
            raise TrainingDiverged(
                f"steps {self.step - self.bad_streak + 1}-{self.step} had a NaN/inf loss or gradient "
                f"{self.bad_streak} times in a row (train.max_bad_steps={limit}); stopping. {last}: resume from it "
                f"with train.resume (e.g. with a lower train.lr)")

    def _layout(self) -> ckpt.Layout:
        return ckpt.Layout(world_size=self.world, ep_size=self.cfg.parallel.ep_size,
                           zero_stage=self.cfg.parallel.zero_stage, bf16=self.bf16,
                           num_experts=self.cfg.model.moe.num_experts, num_moe_layers=len(self.model.moe_layers()))

    def save_checkpoint(self) -> Path:
        """Checkpoint this step boundary (collective: every rank calls it); see `checkpoint.save_checkpoint`."""
        state = ckpt.TrainingState(
            step=self.step, consumed_samples=self.consumed_samples, skipped_steps=self.skipped_steps,
            sampler={"seed": self.sampler.seed, "num_samples": self.sampler.num_samples},
            config=to_dict(self.cfg), layout=self._layout())
        self.last_checkpoint = ckpt.save_checkpoint(self.engine, self.run_dir / ckpt.CHECKPOINT_DIR, state,
                                                    self.cfg.train.keep_last)
        return self.last_checkpoint

    def _load_checkpoint(self, path: Path) -> None:
        """Resume from a validated checkpoint: weights, optimizer (unless the layout changed and
        `train.resume_weights_only` allows that), LR scheduler, step, data position, RNG states."""
        load_optimizer = ckpt.check_compatible(path, ckpt.read_manifest(path), to_dict(self.cfg), self._layout(),
                                               self.cfg.train.resume_weights_only)
        state = ckpt.load_checkpoint(self.engine, path, load_optimizer, trust=self.cfg.train.trust_checkpoint)
        self.step, self.consumed_samples, self.skipped_steps = state.step, state.consumed_samples, state.skipped_steps
        if state.sampler != {"seed": self.sampler.seed, "num_samples": self.sampler.num_samples}:
            ckpt.log(f"the data order differs from the checkpoint's (sampler {state.sampler}, now seed "
                     f"{self.sampler.seed} over {self.sampler.num_samples} samples)")
        if len(state.rng_states) == self.world:
            ckpt.set_rng_state(state.rng_states[self.rank])
        self.last_checkpoint = path
        ckpt.log(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples consumed"
                 f"{'' if load_optimizer else ', optimizer state not loaded'})")

    def _mark_forward(self) -> None:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss over fixed validation batches; every rank runs the same batches, so the MoE all-to-alls stay matched.
        With a blend each batch holds one source, and each source's loss is logged too (`val/<source>/loss`)."""
        self.engine.eval()
        sums = torch.zeros(len(self.data.val), 2, device=self.device, dtype=torch.float64)  # loss·tokens, tokens
        for source, ids in self.val_batches:
            inputs, targets = make_batch(self.data.val[source].dataset, rank_slice(ids, self.rank, self.world))
            self._mark_forward()
            _, lm_loss, _ = self.engine(inputs.to(self.device), targets.to(self.device))
            tokens = torch.tensor(float(targets.numel()), dtype=torch.float64, device=self.device)
            sums[source] += torch.stack([lm_loss.double() * tokens, tokens])
        self.engine.train()
        dist.all_reduce(sums)
        loss = (sums[:, 0].sum() / sums[:, 1].sum()).item()
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        if len(self.data.val) > 1:
            per_source = (sums[:, 0] / sums[:, 1]).tolist()
            metrics.update({f"val/{val.name}/loss": value for val, value in zip(self.data.val, per_source)})
        return metrics

    def _diagnostics(self) -> dict[str, float]:
        """Routers' costly measurements (`metrics.diagnostics_metrics`): averaged over MoE layers; per-layer and
        per-expert values only with `metrics.per_layer`."""
        with torch.no_grad():
            per_layer = [moe.router.diagnostics(moe.local_expert_w1()) for moe in self.model.moe_layers()]
        return diagnostics_metrics(per_layer, self.cfg.metrics.per_layer)

    def train(self) -> dict:
        """Train to `train.max_steps` and return the summary; after a stop signal, return {"interrupted": True,
        "steps", "checkpoint"} once every rank has checkpointed the step boundary (`stop_cause` then says which
        kind of signal). A second SIGINT raises `SecondInterrupt` at once, naming the last complete checkpoint.
        The run directory's lock is released on every way out."""
        try:
            with self.signals:
                try:
                    return self._train_loop()
                except TrainingDiverged:
                    self.loggers.close()
                    raise
                except SecondInterrupt:
                    newest = newest_complete_checkpoint(self.run_dir)
                    raise SecondInterrupt(
                        "second interrupt: aborted without checkpointing; " + (
                            f"the last complete checkpoint is {newest}: resume with train.resume=auto" if newest
                            else f"no checkpoint was written in {self.run_dir / ckpt.CHECKPOINT_DIR}")) from None
        finally:
            self._release_run_dir()

    def _release_run_dir(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def _train_loop(self) -> dict:
        t = self.cfg.train
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.progress, desc=self.cfg.run.name,
                   unit="step", dynamic_ncols=True)
        val = {}
        interval_meter = self.meters[0]
        for meter in self.meters:
            meter.start()
        profiler = None
        while self.step < t.max_steps:
            step = self.step + 1
            diagnostics_due = step % self.cfg.metrics.diagnostics_interval == 0 or step == 1
            eval_due = step % t.eval_interval == 0 or step == t.max_steps
            log_due = step % t.log_interval == 0 or step == t.max_steps or diagnostics_due or eval_due
            if step == t.profile_start:
                profiler = self._start_profiler()
            metrics = self._train_step(log=log_due)
            if profiler is not None and step in (t.profile_start + t.profile_steps - 1, t.max_steps):
                self._write_profile(profiler)
                profiler = None
            for meter in self.meters:
                meter.step(self.tokens_per_step)
            bar.update(1)
            checkpoint_due = self._checkpoint_due()
            if log_due or checkpoint_due:  # evaluation, logging and checkpointing are not charged to training
                for meter in self.meters:
                    meter.pause()
            if log_due:
                metrics.update(interval_meter.compute(reset=True))
                metrics["moe/load_shares"] = self.tracker.last_load_shares()
                if diagnostics_due:
                    metrics.update(self._diagnostics())
                if eval_due:
                    val = self.evaluate()
                    metrics.update(val)
                self.loggers.log(metrics, self.step)
                self.tokens_per_s = metrics.get("perf/tokens_per_s", self.tokens_per_s)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", ppl=f"{metrics['train/ppl']:.1f}",
                                tok_s=f"{self.tokens_per_s:.0f}", refresh=False)
                self.last_metrics = metrics
            if checkpoint_due:
                self.save_checkpoint()
            if self.stop_requested and self.step < t.max_steps:
                break
            if log_due or checkpoint_due:
                for meter in self.meters:
                    meter.start()
        bar.close()
        if profiler is not None:  # stopped by a signal inside the window
            self._write_profile(profiler)
        if self.step < t.max_steps:  # stopped by a signal
            self.loggers.close()
            self.stop_cause = self._stop_cause()
            if self.last_checkpoint is not None and ckpt.step_of(self.last_checkpoint) == self.step:
                ckpt.log(f"{self.stop_cause}: checkpoint at step {self.step} written to {self.last_checkpoint}; "
                         f"resume with train.resume=auto")
            else:  # the last step was skipped (NaN/inf), so it was not checkpointed
                ckpt.log(f"{self.stop_cause} at step {self.step}, not checkpointed after a skipped NaN/inf step; "
                         + (f"the last complete checkpoint is {self.last_checkpoint}: resume with train.resume=auto"
                            if self.last_checkpoint else "no checkpoint was written"))
            return {"interrupted": True, "steps": self.step, "checkpoint": str(self.last_checkpoint)}
        return self._finish(val)

    def _start_profiler(self) -> StepProfiler:
        """torch.profiler from here to the end of step `train.profile_start + train.profile_steps - 1`."""
        trace = self._profile_path(".trace.json") if self.cfg.train.profile_trace else None
        profiler = StepProfiler(self.device, trace)
        profiler.start()
        return profiler

    def _write_profile(self, profiler: StepProfiler) -> None:
        """Stop `profiler` and write this rank's op tables."""
        path = self._profile_path(".txt")
        path.write_text(profiler.stop(f"steps {self.cfg.train.profile_start}-{self.step}, rank {self.rank}"))
        ckpt.log(f"profile of steps {self.cfg.train.profile_start}-{self.step}: {path.parent}")

    def _profile_path(self, suffix: str) -> Path:
        """run.dir/profile/steps<first>-<last>_rank<r><suffix>, the window as configured."""
        first = self.cfg.train.profile_start
        folder = self.run_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"steps{first}-{first + self.cfg.train.profile_steps - 1}_rank{self.rank}{suffix}"

    def _stop_cause(self) -> str:
        """"preempted" if any rank got SIGTERM/SIGUSR1 (the scheduler will want to requeue), else "interrupted"
        (SIGINT). Collective: every rank stops at the same step boundary and calls it."""
        local = 2 if self.signals.preempted else 1 if self.signals.interrupted else 0
        cause = torch.tensor(local, device=self.device)
        dist.all_reduce(cause, op=dist.ReduceOp.MAX)
        return "preempted" if cause.item() == 2 else "interrupted"

    def _checkpoint_due(self) -> bool:
        """At `train.save_interval`, at the end and on a stop signal; never right after a skipped (bad) step."""
        t = self.cfg.train
        due = (self.stop_requested or self.step == t.max_steps
               or (t.save_interval > 0 and self.step % t.save_interval == 0))
        if due and self.bad_streak:
            ckpt.log(f"step {self.step}: no checkpoint after a skipped NaN/inf step; the last good one is "
                     f"{self.last_checkpoint}")
            return False
        return due

    def _unigram_ppl(self) -> float:
        """Perplexity of the training unigram distribution on exactly the validation tokens scored above, from the
        token counts stored at preparation: no pass over the training set."""
        return self.data.unigram_perplexity(self.val_batches)

    def _finish(self, val: dict[str, float]) -> dict:
        val = val or self.evaluate()  # resumed from a checkpoint of the last step: nothing was trained here
        run_meter_summary = self.meters[1].compute()
        summary = {
            "run": self.cfg.run.name, "router": self.cfg.model.moe.router.name,
            "val_loss": val["val/loss"], "val_ppl": val["val/ppl"],
            "unigram_ppl": self._unigram_ppl(),
            "steps": self.step, "tokens": self.step * self.tokens_per_step, "skipped_steps": self.skipped_steps,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "params_total": self.counts.total, "params_active": self.counts.active,
            **{key.removeprefix("perf/"): value for key, value in run_meter_summary.items()},
            "peak_flops_source": self.peak_source,
            **{k: v for k, v in self.last_metrics.items()
               if k.startswith(("moe/", "router/")) and k != "moe/load_shares"},
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.loggers.summary(summary)
        self.loggers.close()
        return summary
