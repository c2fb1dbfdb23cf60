"""keep_freed_host_memory: a large temporary that a step allocates again reuses its pages instead of faulting
them in anew (counted by the kernel's minor page faults, not timed)."""
import ctypes
import resource

import torch

from mmolre import host_memory


def faults_of_reallocating(times: int = 20, megabytes: int = 4) -> int:
    for _ in range(times):   # warm: the heap settles around the block (the first ones fault in any case)
        torch.empty(megabytes * 2 ** 18).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(megabytes * 2 ** 18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_are_reused_without_page_faults(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    libc = ctypes.CDLL("libc.so.6")
    try:
        libc.mallopt(host_memory.M_MMAP_THRESHOLD, 128 * 1024)   # glibc's start: 4 MB blocks are mapped afresh
        libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
        mapped_afresh = faults_of_reallocating()
        assert host_memory.keep_freed_host_memory()
        reused = faults_of_reallocating()
    finally:
        host_memory.keep_freed_host_memory()
    assert mapped_afresh >= 20 * 1000   # 1,024 pages per 4 MB block, faulted in every time
    assert reused < mapped_afresh / 20


def test_the_users_own_glibc_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory.keep_freed_host_memory() is False
