"""A training step keeps its work on the device: the stand-in, on CPU, for the GPU stalls that host syncs cause.

On a GPU, `.item()`, `nonzero` (boolean-mask indexing) and friends make the host wait for every queued kernel;
gloo and the CPU hide that cost, so this counts the ops themselves with the profiler. A step that is not a logging
step may read the device once: the step-boundary verdict (NaN/inf anywhere, stop signal anywhere), which every rank
needs before it steps the optimizer. DeepSpeed's optimizer wrappers read their gradient norm back a fixed number of
times (`DEEPSPEED_NORM_READS`: whether the norm is valid; at ZeRO-0 bf16 also each group's norm and the total);
their per-parameter overflow checks and per-group clip reads are gone (`moe_lm/moe/engine.py`).
"""

import json

import pytest
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import load_config
from tests.distributed_utils import run_distributed
from tests.train.test_trainer import tiny_overrides

HOST_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
MAX_HOST_READS_PER_STEP = 1
CPU_ONLY_READERS = ("aten::_grouped_mm", "aten::_fused_adamw_")
"""Ops whose CPU kernels read scalars (group offsets, the step count) while their CUDA kernels take them on the
device: their reads are not the GPU's."""


def host_syncs(events) -> dict[str, int]:
    """Count of each host-syncing op, leaving out those issued inside `CPU_ONLY_READERS`."""
    def inside_cpu_only_reader(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in CPU_ONLY_READERS:
                return True
            parent = parent.cpu_parent
        return False

    return {name: sum(1 for e in events if e.name == name and not inside_cpu_only_reader(e)) for name in HOST_SYNC_OPS}


def _profile_steps(rank, world_size, overrides, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    for _ in range(2):  # warm-up: first-step allocations and lazy initialisation
        trainer._train_step(log=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer._train_step(log=False)
    out.write_text(json.dumps(host_syncs(prof.events())))


VARIANTS = {
    "softmax_topk": [],
    "aux_free": ["model.moe.router.bias_update_rate=0.001"],  # per-step counts for the bias: reduced, not read
    "mpi": ["model.moe.router.name=mpi"],
    "grmoe": ["model.moe.router.name=grmoe"],
    "sinkhorn": ["model.moe.router.name=sinkhorn"],  # global column sums: all-reduced every round, never read
    "hash": ["model.moe.router.name=hash"],  # no router parameters: hashes the input ids on the device
    "expert_choice": ["model.moe.router.name=expert_choice"],
    "softmax_topk_capacity": ["model.moe.drop_tokens=true", "model.moe.capacity_factor=1.0"],
    "softmax_topk_accumulation_clipping": ["train.grad_accum_steps=2", "train.grad_clip=0.01"],
    "bf16": ["train.precision=bf16", "train.grad_clip=0.01"],  # DeepSpeed's FP16_Optimizer, in bf16
    "zero2_bf16": ["parallel.zero_stage=2", "train.precision=bf16", "train.grad_clip=0.01"],  # the 2.7b_e32 recipes'
    # the other GPU recipes' path: ZeRO-1, the reduction after the last of several micro-batches
    "zero1_bf16_accumulation": ["parallel.zero_stage=1", "train.precision=bf16", "train.grad_accum_steps=4",
                                "train.grad_clip=0.01"],
}
DEEPSPEED_NORM_READS = {"bf16": 4, "zero2_bf16": 1, "zero1_bf16_accumulation": 1}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_training_step_reads_the_device_at_most_once(variant, tmp_path):
    out = tmp_path / "syncs.json"
    run_distributed(_profile_steps, 1, tiny_overrides(tmp_path, *VARIANTS[variant]), out)
    counts = json.loads(out.read_text())
    assert counts["aten::nonzero"] == 0, counts
    assert counts["aten::_local_scalar_dense"] <= MAX_HOST_READS_PER_STEP + DEEPSPEED_NORM_READS.get(variant, 0), counts
