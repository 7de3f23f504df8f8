"""Host memory for training on CPU: keep freed blocks instead of giving them back to the OS.

glibc serves blocks over its mmap threshold (128 KiB at first, up to 32 MiB as it adapts) with a fresh `mmap`
and unmaps them when freed, and trims the heap's free top. A CPU training step frees and re-allocates its
activations and gradients (MiBs each) every micro-batch, so each one page-faults all of its 4 KiB pages again,
and elementwise ops on them ran several times slower than on memory already mapped. Keeping the freed memory in
the heap makes CPU training steps faster, more so with more experts (the A/B is in docs/performance.md). This is
what `torch.backends.xeon.run_cpu` gets by preloading jemalloc or tcmalloc, done in-process with glibc's own
`mallopt`. The process's resident memory then stays at its peak, which a training process reaches in its first
steps anyway. GPU training allocates its tensors through CUDA's caching allocator and is left as it is.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top before glibc returns any (mallopt takes a C int)


def keep_freed_host_memory() -> bool:
    """Serve every allocation from the heap (no per-block mmap) and never trim it, for the rest of this
    process. True where that took effect; False where the C library has no glibc `mallopt` (macOS, musl), which
    changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
