"""scripts/benchmark.py's router measurement: time and dispatched ops of one router forward + backward.

No assertion on speed: speed figures come from the benchmark itself, never from timed tests.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_lm.train.profiling import dispatched_ops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "scripts"))  # the script imports its sibling `runs`
        spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


def test_router_measurement_counts_the_ops_each_router_dispatches(benchmark):
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    ops = {}
    for router in ("softmax_topk", "grmoe"):
        ms, ops[router] = benchmark.router_fwd_bwd(recipe, router, repeats=1, overrides=[])
        assert ms > 0
    # a linear layer and a softmax, against subspace frames, Bingham normalisers and their losses
    assert 0 < ops["softmax_topk"] < ops["grmoe"]


def test_ops_inside_other_ops_are_not_counted_again():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.linear(x, w)  # aten::linear runs aten::t and aten::matmul/mm inside
    assert dispatched_ops(prof.events()) == 1
