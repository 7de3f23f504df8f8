"""What a GPU run needs from every registered router, checked on CPU, where gloo and a CPU stream let it slide.

- Every parameter and buffer is contiguous, at construction and after optimizer steps: `deepspeed.initialize`
  broadcasts them over NCCL, which rejects strided tensors ("Tensors must be contiguous"); gloo accepts them.
- A compiled router (`train.compile`) takes the eager router's training step, in one process and across an
  expert-parallel group.
- A training forward + backward of the router reads nothing back to the host. `.item()`, `.tolist()`, `float(t)`,
  `nonzero`, boolean-mask indexing and `bincount` each wait for the GPU stream to drain, once per MoE layer and
  micro-batch. On CPU the torch profiler still records the aten ops they go through (`HOST_SYNC_OPS`), and the
  host copies that no aten op shows on CPU are spied on by name (`HOST_COPY_METHODS`). Not seen on CPU:
  `torch.tensor(data, device=...)`, a blocking host-to-device copy on a GPU.

Each router is built inside the quickstart model, with its defaults and with each option that changes its
structure (extra parameters, buffers or code paths). Shape suffixes: T tokens, D model width.
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import load_config
from moe_lm.model.transformer import MoETransformer
from moe_lm.routers import REGISTRY
from moe_lm.routers.functional import assignment_counts
from tests.distributed_utils import run_distributed

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
T = 64

STRUCTURAL_OPTIONS: dict[str, list[list[str]]] = {
    "softmax_topk": [["bias_update_rate=0.01"], ["jitter_eps=0.01"]],
    "grmoe": [["variational=logit"], ["variational=concentration"], ["dispatch=sample", "selection_bias=none"],
              ["load_balance_coef=0.01"], ["selection_bias=none"], ["selection_bias=learned"],
              ["kappa_calibration=true"], ["kappa_lr_scale=10", "alpha_jitter=0.5"]],
    "mpi": [["power=false"], ["detach_w1=true"], ["power_steps=2"], ["z_loss_coef=0.001"], ["balance_scope=sequence"]],
}
"""Non-default router options that add parameters, buffers or forward paths; every registered router also runs
with its defaults."""

VARIANTS = [(name, []) for name in REGISTRY] + [(name, options) for name, variants in STRUCTURAL_OPTIONS.items()
                                                 for options in variants]

HOST_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::masked_select",
                 "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::equal")
"""aten ops that read a device value or a data-dependent size back to the host. `.item()`, `float(t)`, `int(t)`
and `bool(t)` all end in `_local_scalar_dense`; boolean-mask indexing goes through `nonzero`."""

HOST_COPY_METHODS = ("tolist", "numpy", "cpu")
"""Tensor methods that copy to the host with no aten op the CPU profiler would record."""


def variant_id(variant: tuple[str, list[str]]) -> str:
    name, options = variant
    return "-".join([name, *options])


def build_model(name: str, options: list[str], ep_size: int = 1, ep_rank: int = 0) -> MoETransformer:
    overrides = [f"model.moe.router.name={name}", *(f"model.moe.router.{option}" for option in options)]
    with warnings.catch_warnings():  # switching router drops the recipe's softmax_topk keys, with a warning
        warnings.filterwarnings("ignore", message="router switched", category=UserWarning)
        cfg = load_config(QUICKSTART, overrides)
    torch.manual_seed(0)
    return MoETransformer(cfg.model, ep_size=ep_size, ep_rank=ep_rank)


def router_step(layer, x_TD: torch.Tensor):
    """One training forward + backward of the layer's router alone: LM-proxy weights plus its unscaled aux losses."""
    router = layer.router
    token_ids_T = torch.arange(x_TD.shape[0], device=x_TD.device) * 37 % 4096  # for routers that hash token ids
    out = router(x_TD, expert_w1_EFD=layer.local_expert_w1() if router.needs_expert_w1 else None,
                 token_ids_T=token_ids_T, sequence_length=x_TD.shape[0] // 4)
    weights = out.weights_EC if out.expert_choice else out.weights_TK
    loss = weights.float().sum() + sum(out.aux_losses.values())
    if loss.requires_grad:  # a fixed router (hash) has nothing to backpropagate into
        loss.backward()
    return out


def strided_tensors(model: torch.nn.Module) -> list[str]:
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if not tensor.is_contiguous()]


def count_host_syncs(fn) -> dict[str, int]:
    """{op or method: calls} of the host reads made while `fn()` runs (empty when there are none)."""
    counts = collections.Counter()

    def spy(method: str):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, **kwargs):
            counts[f"Tensor.{method}"] += 1
            return original(self, *args, **kwargs)
        return counted

    with contextlib.ExitStack() as stack:
        for method in HOST_COPY_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, method, spy(method)))
        prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
        fn()
    counts.update(event.name for event in prof.events() if event.name in HOST_SYNC_OPS)
    return dict(counts)


def test_every_registered_router_has_its_structural_options_listed():
    assert set(STRUCTURAL_OPTIONS) <= set(REGISTRY)
    assert {name for name, _ in VARIANTS} == set(REGISTRY)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_parameters_and_buffers_are_contiguous_before_and_after_adamw_steps(variant):
    """Regression: grmoe's `frame_basis_EMP` was a transposed view, and NCCL's broadcast in deepspeed.initialize
    refused it on the first GPU run."""
    model = build_model(*variant)
    assert strided_tensors(model) == []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for layer in model.moe_layers():
            layer.train()
            out = router_step(layer, torch.randn(T, model.cfg.d_model, generator=gen))
            if layer.router.needs_step_counts:
                layer.router.post_step(assignment_counts(out.expert_ids_TK, model.cfg.moe.num_experts))
        optimizer.step()
        optimizer.zero_grad()
    assert strided_tensors(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_router_training_forward_and_backward_never_read_back_to_the_host(variant, dtype):
    """bf16 takes the half-precision paths (e.g. mpi recomputes its fp32 copy of W1 in backward)."""
    layer = build_model(*variant).to(dtype).moe_layers()[0]
    layer.train()
    x_TD = torch.randn(T, layer.router.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)
    router_step(layer, x_TD)  # warm-up: one-time work (caches, lazy init) is allowed to read the host
    assert count_host_syncs(lambda: router_step(layer, x_TD)) == {}


def _expert_parallel_worker(rank: int, world_size: int) -> None:
    syncs = {}
    for name in REGISTRY:
        layer = build_model(name, [], ep_size=world_size, ep_rank=rank).moe_layers()[0]
        layer.set_deepspeed_parallelism()  # what deepspeed.initialize does: the EP group, then the router's
        assert layer.router.ep_group is not None
        layer.train()
        x_TD = torch.randn(T, layer.router.d_model, generator=torch.Generator().manual_seed(rank))
        router_step(layer, x_TD)
        syncs[name] = count_host_syncs(lambda: router_step(layer, x_TD))  # noqa: B023 (called right here)
    assert syncs == {name: {} for name in REGISTRY}


def test_expert_parallel_router_step_never_reads_back_to_the_host():
    """ep_size=2 over gloo: the collectives (mpi's all-gather of φ and its reduce in backward, the global sums of
    the balance losses) must not hide a host read either."""
    run_distributed(_expert_parallel_worker, 2)


def test_the_sync_counter_sees_item_tolist_and_mask_indexing():
    x = torch.randn(8)
    counts = count_host_syncs(lambda: (float(x.sum()), x.tolist(), x[x > 0]))
    assert counts["aten::_local_scalar_dense"] == 1 and counts["Tensor.tolist"] == 1 and counts["aten::nonzero"] == 1
    assert count_host_syncs(lambda: x.sum() * 2) == {}


def _compiled_and_eager_steps(build, x_TD: torch.Tensor) -> tuple:
    """One training step of a router built by `build()`, eager and compiled (aot_eager: dynamo's graph and
    autograd's, run as eager ops, so no C++ build and the same random numbers), from the same state and seed."""
    os.environ["TORCHDYNAMO_DISABLE"] = "0"  # the test environment turns dynamo off
    results = []
    for compiled in (False, True):
        layer = build()
        layer.train()
        if compiled:
            layer.router.compile(backend="aot_eager")
        torch.manual_seed(2)
        out = router_step(layer, x_TD)
        grads = {name: p.grad for name, p in layer.router.named_parameters() if p.grad is not None}
        results.append((out, grads))
    return results


def assert_same_step(eager, compiled) -> None:
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    for field in ("expert_ids_TK", "weights_TK", "token_ids_EC", "weights_EC"):
        if getattr(out_e, field, None) is not None:
            torch.testing.assert_close(getattr(out_c, field), getattr(out_e, field), msg=field)
    torch.testing.assert_close({k: v.detach() for k, v in out_c.aux_losses.items()},
                               {k: v.detach() for k, v in out_e.aux_losses.items()})
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], msg=name)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_a_compiled_router_takes_the_eager_step(variant, monkeypatch):
    """`train.compile` compiles each router (`compile_static_parts`): dynamo must trace it whole, options and
    all, to the same routing, aux losses and gradients."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    name, options = variant
    x_TD = torch.randn(T, 128, generator=torch.Generator().manual_seed(1))
    assert_same_step(*_compiled_and_eager_steps(lambda: build_model(name, options).moe_layers()[0], x_TD))


def _compiled_expert_parallel_worker(rank: int, world_size: int) -> None:
    for name in REGISTRY:
        def build(name=name):
            layer = build_model(name, [], ep_size=world_size, ep_rank=rank).moe_layers()[0]
            layer.set_deepspeed_parallelism()
            return layer
        x_TD = torch.randn(T, 128, generator=torch.Generator().manual_seed(rank))
        assert_same_step(*_compiled_and_eager_steps(build, x_TD))


def test_a_compiled_router_takes_the_eager_step_across_an_expert_parallel_group():
    """ep_size=2 over gloo: the collectives inside the routers (global balance sums, mpi's all-gather) are traced
    or split the graph, and the step stays the eager one."""
    run_distributed(_compiled_expert_parallel_worker, 2, timeout_s=300)
