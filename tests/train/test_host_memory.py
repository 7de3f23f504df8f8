"""On CPU the trainer keeps freed host memory in the C heap, so that a tensor a step allocates again is not
mapped afresh and page-faulted in again (`moe_lm/train/host_memory.py`)."""

import ctypes
import json
import sys

import pytest

from moe_lm.config import load_config
from tests.distributed_utils import run_distributed
from tests.train.test_trainer import tiny_overrides

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc >= 2.33 (mallinfo2) only")

MIB = 1 << 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _allocate_and_free(rank, world_size, setup, overrides, out):
    """In a fresh process: apply `setup`, then report the bytes mmapped for a 64 MiB tensor and the free bytes
    the heap keeps once it is freed."""
    import torch

    from moe_lm.train.host_memory import keep_freed_host_memory

    if setup == "keep":
        assert keep_freed_host_memory()
    elif setup == "trainer":
        from moe_lm.train import Trainer

        Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mapped_before = libc.mallinfo2().hblkhd
    block = torch.empty(64 * MIB, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - mapped_before
    del block
    out.write_text(json.dumps({"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks}))


def allocate_and_free(tmp_path, setup, *overrides) -> dict:
    out = tmp_path / f"{setup}.json"
    run_distributed(_allocate_and_free, 1, setup, list(overrides), out)
    return json.loads(out.read_text())


def test_a_large_tensor_comes_from_the_heap_and_stays_there_when_freed(tmp_path):
    report = allocate_and_free(tmp_path, "keep")
    assert report["mapped"] == 0
    assert report["free_in_heap"] >= 64 * MIB


def test_by_default_glibc_maps_a_large_tensor_and_unmaps_it_when_freed(tmp_path):
    report = allocate_and_free(tmp_path, "default")
    assert report["mapped"] >= 64 * MIB
    assert report["free_in_heap"] < 64 * MIB


@pytest.mark.parametrize("keep", [True, False])
def test_the_cpu_trainer_keeps_freed_memory_unless_the_recipe_says_not_to(tmp_path, keep):
    report = allocate_and_free(tmp_path, "trainer", *tiny_overrides(tmp_path, f"train.keep_freed_host_memory={keep}"))
    assert (report["mapped"] == 0) == keep
