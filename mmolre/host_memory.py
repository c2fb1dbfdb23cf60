"""Keep freed host memory in the process, so a step's large temporary tensors do not page-fault every time.

glibc serves blocks above its mmap threshold (128 KiB, rising with use) by mapping fresh pages and gives freed
memory at the top of its heap back to the kernel past its trim threshold. A CPU step allocates and frees the
same large temporaries every step (the gate's [rows, experts] logits, softmax and their gradients: 4 MB each at
16,384 experts), so each one page-faults all its pages again: filling a fresh 4 MB buffer took 1.4 ms where
writing a reused one takes a fraction of that. CUDA's caching allocator does this job on GPUs, and PyTorch's
CPU performance guide recommends jemalloc or tcmalloc for the same reason; this sets the two glibc thresholds
instead, with no new dependency. Measured: one task gate's forward+backward at 16,384 experts 19-23 ms -> 14 ms;
a training step at 1,024 and 16,384 experts in bench/results/expert_scale.md. The cost: memory a step freed is
kept for the next step (peak memory is unchanged; the resident size stays near the peak).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024 ** 2                  # the largest glibc accepts on 64-bit: bigger blocks are mapped
TRIM_THRESHOLD = 1024 ** 3                       # give the heap's free top back only past 1 GiB


def keep_freed_host_memory() -> bool:
    """Set glibc's thresholds (unless MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set: the user's
    choice stands). False where the C library is not glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")   # glibc's name (find_library would start a process to look)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
