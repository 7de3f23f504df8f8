"""The DeepSpeed training engine, in moe-lm's terms: the process group, the engine around the model and its
optimizer, and the gradient norm over all experts.

With `deepspeed_moe.py` (the MoE layer) and `deepspeed_checkpoint.py` (the checkpoint files) this is the only code
that imports DeepSpeed (tests/test_boundaries.py checks it). The trainer drives the engine it returns as a module:
`engine(inputs, targets)`, `engine.backward(loss)`, `engine.step()`, `engine.module`.

Expert parallelism (DeepSpeed's default topology, `deepspeed/utils/groups.py`): with world W and `ep_size` P,
the expert-parallel groups are P consecutive ranks [0..P-1], [P..2P-1], ... (the all-to-all), the
expert-data-parallel groups are the ranks with the same position in them, {i, i+P, i+2P, ...} (the all-reduce
of expert gradients), and dense gradients are averaged over all W ranks. Rank r holds the experts
[(r % P)·E/P, (r % P + 1)·E/P).
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable

import deepspeed
import deepspeed.comm.torch  # noqa: F401  (loaded so that `_skip_shm_build` can reach it)
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from moe_lm.config import Config


def _skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op (~1 min) on CPU at every fresh init; it only serves inference
    all-reduce, which training never calls. Internal API, hence the guard; `sys.modules`, since the attribute
    `deepspeed.comm.torch` names the torch library."""
    torch_backend = sys.modules.get("deepspeed.comm.torch")
    if torch_backend is not None and hasattr(torch_backend, "build_shm_op"):
        torch_backend.build_shm_op = lambda: None


def init_process_group(backend: str, timeout_s: float) -> None:
    """torch.distributed from the RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment, through DeepSpeed, so
    that its communication layer (the engine's reductions, the MoE all-to-all) is set up over the same group.
    `timeout_s` bounds the rendezvous and every later collective."""
    _skip_shm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """`param_groups` with the expert parameters moved into groups of their own, one per expert-parallel group
    (named after it: the engine reduces their gradients over that group's expert-data-parallel ranks, and ZeRO 1/2
    require the split)."""
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.global_batch_size(world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW: no JIT-compiled fused/CPU Adam
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config, world_size: int,
                 bf16: bool) -> tuple[deepspeed.DeepSpeedEngine, Callable[[], torch.Tensor] | None]:
    """(engine, measure_grad_norm): DeepSpeed's engine around `model`, stepping `optimizer` (param groups from
    `expert_param_groups`) and `scheduler` at each accumulation boundary of `cfg.train`, with ZeRO
    `cfg.parallel.zero_stage`, bf16 or fp32; and a `measure()` whose device scalar is finite exactly when the
    gradients this rank is about to step with are: from `install_moe_grad_clipping` at ZeRO-0 fp32, from
    `install_fused_zero_reductions` at ZeRO-1/2, None at ZeRO-0 bf16 (the module's own gradients then)."""
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world_size, bf16))
    measure_grad_norm = install_moe_grad_clipping(engine) or install_fused_zero_reductions(engine)
    install_bf16_overflow_verdict(engine)
    if world_size == 1 and not (engine.zero_optimization() or bf16):
        # nothing to reduce; DeepSpeed would still flatten, "reduce" and copy back every gradient (ZeRO and its
        # bf16 optimizer also move gradients into their own buffers there, so they keep the call)
        engine.enable_backward_allreduce = False
    return engine, measure_grad_norm


def grad_norm(engine: deepspeed.DeepSpeedEngine) -> float:
    """The gradient norm of the last optimizer step, before clipping (NaN where none was measured)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def coalesce_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors`, with every set of them that tiles one stretch of a storage replaced by one flat view of it.

    The local experts' weight gradients of a layer are such a set: slices of one stacked gradient
    (`dispatch.stack_weights`; autograd keeps them as separate tensors on one storage). A multi-tensor op then
    covers each stack at once. This matters on CPU, where `torch._foreach_*` runs one kernel per tensor (768 expert
    gradients at 64 experts and 4 layers), each too small to spread over the threads."""
    kept, by_storage = [], {}
    for tensor in tensors:
        if tensor.is_contiguous():
            key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.numel())
            by_storage.setdefault(key, []).append(tensor)
        else:
            kept.append(tensor)
    for (_, _, size), group in by_storage.items():
        offsets = sorted(t.storage_offset() for t in group)
        if len(group) > 1 and offsets == list(range(offsets[0], offsets[0] + len(group) * size, size)):
            kept.append(group[0].as_strided((len(group) * size,), (1,), offsets[0]))
        else:
            kept.extend(group)
    return kept


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ ||g||² over `grads` in float64, from one fused multi-tensor norm (no per-parameter kernels)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(coalesce_views(grads), 2.0, dtype=torch.float32)).double().square().sum()


def moe_grad_norm(parameters) -> torch.Tensor:
    """L2 norm of the whole model's gradient with every expert counted once: the same number on every rank and
    for every layout (the single-process norm of the same global batch).

    Call it after DeepSpeed's gradient reduction: dense gradients are then identical on all ranks, and expert
    gradients identical within an expert-data-parallel group, so summing the local experts' squared norms over
    the expert-parallel group covers each expert exactly once. A collective over every expert-parallel group; a
    device tensor, never read back here.
    """
    parameters = list(parameters)
    device = parameters[0].device
    dense, experts = [], {}
    for param in parameters:
        if param.grad is None:
            continue
        if is_moe_param(param):
            experts.setdefault(param.group_name, []).append(param.grad.detach())
        else:
            dense.append(param.grad.detach())
    total = _squared_norm(dense, device)
    for name in sorted(experts):  # the same order on every rank
        squared = _squared_norm(experts[name], device)
        group = groups._get_expert_parallel_group(name) if torch.distributed.is_initialized() else None
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(squared, group=group)
        total = total + squared
    return total.sqrt()


def install_moe_grad_clipping(engine: deepspeed.DeepSpeedEngine) -> Callable[[], torch.Tensor] | None:
    """Exact gradient clipping for ZeRO stage 0 in fp32 (DeepSpeed's `clip_fp32_gradients` path).

    DeepSpeed's own clipping there averages each rank's local norm over the data-parallel group. Under expert
    parallelism ranks hold different experts, so that average is not the model's gradient norm (nor the
    1-process one, and the clipping differs with it), and the engine records no norm at all
    (`get_global_grad_norm()` is None). This replaces it with `moe_grad_norm`, clips with the configured
    `gradient_clipping` on the device (no host read: a non-finite norm leaves the gradients as they are, for the
    skipped-step logic), and records the norm tensor for `get_global_grad_norm()`. ZeRO 1/2 compute the norm over
    the expert groups themselves (tests/train/test_distributed.py checks ZeRO-2 against 1 process); DeepSpeed's
    bf16 optimizer keeps its own clipping.

    Returns `measure()`, which computes the norm of the gradients as they stand (a device tensor) for the coming
    clip, so that a caller that needs the norm before the step (the NaN/inf check) and the clip share one pass over
    the gradients; None where DeepSpeed clips by itself.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    max_norm = float(engine.gradient_clipping())
    measured: list[torch.Tensor] = []

    def measure() -> torch.Tensor:
        measured[:] = [moe_grad_norm(engine.module.parameters())]
        return measured[0]

    def clip_fp32_gradients() -> None:
        grads = [p.grad.detach() for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
        norm = measured.pop() if measured else moe_grad_norm(engine.module.parameters())
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(coef), coef, 1.0).to(torch.float32)
        torch._foreach_mul_(coalesce_views(grads), coef)
        engine._global_grad_norm = norm  # what get_global_grad_norm() returns (torch optimizers set none)

    engine.clip_fp32_gradients = clip_fp32_gradients
    return measure


def install_fused_zero_reductions(engine: deepspeed.DeepSpeedEngine) -> Callable[[], torch.Tensor] | None:
    """ZeRO-1/2 without their per-parameter passes over the gradients.

    DeepSpeed's ZeRO optimizer takes the gradient norm with one kernel per gradient (after casting it to fp64) and,
    in bf16, checks every gradient for NaN/inf with five more kernels and a host read: about 3,000 kernel launches
    a step for 350m_e8 on one H200, where the step was bound by the host's launches (docs/performance.md). This
    replaces, on this engine's optimizer only:
    - the norm by one fused multi-tensor norm with the same reductions (the data-parallel all-reduce, then the
      model-parallel one), an invalid norm masked to -1 on the device as DeepSpeed does;
    - the clip's test of that norm, one host read per parameter group, by the same clip computed on the device;
    - the overflow check by the trainer's verdict, which the client optimizer holds in `overflow` before the step
      (`SkippableAdamW`), already all-reduced over every rank. DeepSpeed then skips a bad step as before: no
      update, no scheduler step, `skipped_steps` counted.
    - the re-pointing of every parameter at its slice of the flat bit16 buffer after each step by a check that
      each still is (DeepSpeed's comment: "we probably don't need this? just to be safe").

    moe-lm has no pipeline or tensor parallelism, so every gradient counts once (DeepSpeed's replica and
    model-parallel filters select them all). Returns `measure()`, the norm over this rank's reduced gradient
    partitions for the trainer's verdict; None below ZeRO-1.
    """
    zero = engine.optimizer
    if not engine.zero_optimization() or not hasattr(zero, "averaged_gradients"):
        return None
    original_norm = type(zero).get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original_norm(zero, gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        squared = _squared_norm(grads, zero.device).float()
        torch.distributed.all_reduce(squared, group=zero.dp_process_group)
        zero._model_parallel_all_reduce(tensor=squared, op=torch.distributed.ReduceOp.SUM)
        norm = squared.sqrt()
        return torch.where(torch.isfinite(norm), norm, -1.0)

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if zero.clip_grad == 0.0 and zero.loss_scale == 1.0:
            return
        combined_scale = zero.loss_scale
        if zero.clip_grad > 0.0:  # an invalid norm (NaN, inf, the -1 sentinel) clips as an infinite one
            norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
            combined_scale = (((norm / zero.loss_scale) + 1e-6) / zero.clip_grad).clamp(min=1.0) * zero.loss_scale
        for grad in grad_groups_flat:
            for part in (grad if isinstance(grad, list) else [grad]):
                part.data.mul_(1.0 / combined_scale)

    def has_overflow(partition_gradients=True) -> bool:
        return bool(zero.optimizer.overflow)

    def measure() -> torch.Tensor:
        grads = [g for group in zero.averaged_gradients.values() if group is not None for g in group if g is not None]
        return _squared_norm(grads, zero.device)

    rebind = zero._update_model_bit16_weights
    bound: dict[int, list[int]] = {}

    def addresses(group_index: int) -> list[int]:
        return [zero.bit16_groups_flat[group_index].data_ptr()] + [p.data_ptr() for p in zero.bit16_groups[group_index]]

    def update_model_bit16_weights(group_index: int) -> None:
        # after every step DeepSpeed points each parameter at its slice of the group's flat buffer again ("just to
        # be safe": several ops a parameter, host work only); not while the buffer and every parameter are unmoved
        if bound.get(group_index) != addresses(group_index):
            rebind(group_index)
            bound[group_index] = addresses(group_index)

    zero.get_grad_norm_direct = get_grad_norm_direct
    zero.unscale_and_clip_grads = unscale_and_clip_grads
    zero.has_overflow = has_overflow
    zero._update_model_bit16_weights = update_model_bit16_weights
    return measure


def install_bf16_overflow_verdict(engine: deepspeed.DeepSpeedEngine) -> None:
    """bf16 at ZeRO-0 without a host read per parameter.

    DeepSpeed wraps the optimizer there in its FP16_Optimizer, whose overflow check tests the gradients one by one
    and reads each verdict back to the host: a GPU sync per parameter, ~230 a step at the GPU peer shape. The check
    takes the trainer's verdict instead, held by the client optimizer (`SkippableAdamW.overflow`) before the step
    and computed over the same gradients (the module's own, which this wrapper steps from). DeepSpeed then skips a
    bad step as before."""
    wrapper = engine.optimizer
    checker = getattr(wrapper, "overflow_checker", None)
    if engine.zero_optimization() or not engine.bfloat16_enabled() or checker is None:
        return

    def has_overflow(params, has_moe_params=None) -> bool:
        return bool(wrapper.optimizer.overflow)

    checker.has_overflow = has_overflow
