"""glibc malloc settings that stop a training step from faulting its activations in anew.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with
a fresh mmap and gives it back with munmap on free. A decoder step allocates many activations
above that: at Qwen2.5-0.5B's shapes one MLP activation of 2,048 tokens is 2,048 x 4,864 fp32 =
38 MiB, allocated and freed again in every layer, forward and backward, so the kernel hands out
and zeroes fresh pages all step long (minor page faults and system time: docs/speed.md).

`keep_freed_memory` tells glibc to serve everything from its heap (M_MMAP_MAX 0) and to keep up
to `trim_threshold` bytes of freed heap instead of returning it (M_TRIM_THRESHOLD). Measured
(docs/speed.md, `scripts/profile_step.py --keep-freed-memory`; tests/test_allocator.py): the
heap settles after a few steps at one size (torch asks for 64-byte-aligned blocks, which fit the
freed chunks only once the heap has grown around them), and each new, longer batch grows it
again: one Qwen2.5-0.5B-shaped step of 4 x 512 tokens took 1.6 M faults instead of 3.1 M and
59.1 s instead of 61.5 s. A gain that small, against a heap that keeps its peak, has not yet
earned a default; cpuft keeps it off and this helper is here to measure it.

Limits: glibc only (musl, or jemalloc/tcmalloc preloaded, ignore these calls: `keep_freed_memory`
returns False when there is no glibc `mallopt`); allocations made before the call keep their
placement.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse; True when glibc took both."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
