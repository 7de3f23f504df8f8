"""Test-wide environment: CPU, offline, deterministic, no JIT builds; and the `one_thread` and `sleeper`
fixtures."""

import os
import subprocess

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "moe-lm-test-hf"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only fights the other processes for the shared cores."""
    import torch  # not at the top: the environment above must be set before torch and DeepSpeed load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sleeper():
    """A live process that is not this one (a lock holder, a pid that exists)."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()
