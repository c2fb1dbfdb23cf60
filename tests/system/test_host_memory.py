"""keep_freed_host_memory: a large temporary that a step frees stays in the process for the next step instead
of going back to the kernel (and being faulted in anew). Read from glibc's own accounting (mallinfo2), in a
fresh process: glibc maps a block afresh only when its heap has no free chunk to serve it, so a process that
has already run other work (a test session) may serve a 4 MB block from its heap at any threshold."""
import os
import subprocess
import sys

from mmolre import host_memory
from tests.launcher import ROOT

MEASURE = r'''
import ctypes, torch
from mmolre import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def held_from_kernel():
    info = libc.mallinfo2()
    return info.arena + info.hblkhd

def bytes_a_free_gives_back(megabytes=4):
    for _ in range(5):   # warm: the heap settles around the block
        torch.empty(megabytes * 2 ** 18).fill_(1.0)
    block = torch.empty(megabytes * 2 ** 18).fill_(1.0)
    holding = held_from_kernel()
    del block
    return holding - held_from_kernel()

libc.mallopt(host_memory.M_MMAP_THRESHOLD, 128 * 1024)   # glibc's start (fixed: no dynamic raise)
libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
by_default = bytes_a_free_gives_back()
assert host_memory.keep_freed_host_memory()
print(by_default, bytes_a_free_gives_back())
'''


def test_freed_blocks_stay_in_the_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    given_back_by_default, given_back_when_kept = map(int, proc.stdout.split()[-2:])
    assert given_back_by_default >= 4 * 1024 ** 2   # the whole block is unmapped, to be faulted in again
    assert given_back_when_kept == 0


def test_the_users_own_glibc_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory.keep_freed_host_memory() is False
