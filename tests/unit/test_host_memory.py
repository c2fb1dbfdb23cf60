"""keep_freed_host_memory: a large temporary that a step frees stays in the process for the next step instead
of going back to the kernel (and being faulted in anew). Read from glibc's own accounting (mallinfo2), not from
timings or the kernel's fault counters, which sandboxed kernels do not all keep."""
import ctypes

import torch

from mmolre import host_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def bytes_a_free_gives_back(megabytes: int = 4) -> int:
    """What freeing one step temporary of `megabytes` returns to the kernel: unmapped blocks plus trimmed heap."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def held_from_kernel() -> int:
        info = libc.mallinfo2()
        return info.arena + info.hblkhd

    for _ in range(5):   # warm: the heap settles around the block
        torch.empty(megabytes * 2 ** 18).fill_(1.0)
    block = torch.empty(megabytes * 2 ** 18).fill_(1.0)
    holding = held_from_kernel()
    del block
    return holding - held_from_kernel()


def test_freed_blocks_stay_in_the_process(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    libc = ctypes.CDLL("libc.so.6")
    try:
        libc.mallopt(host_memory.M_MMAP_THRESHOLD, 128 * 1024)   # glibc's start: 4 MB blocks are mapped afresh
        libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
        given_back_by_default = bytes_a_free_gives_back()
        assert host_memory.keep_freed_host_memory()
        given_back_when_kept = bytes_a_free_gives_back()
    finally:
        host_memory.keep_freed_host_memory()
    assert given_back_by_default >= 4 * 1024 ** 2   # the whole block is unmapped, to be faulted in again
    assert given_back_when_kept == 0


def test_the_users_own_glibc_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory.keep_freed_host_memory() is False
