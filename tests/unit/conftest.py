"""The fast tier: no launcher, no subprocess, no spawned or forked process. A test that needs one belongs in
tests/system/; this guard makes such a test fail here instead of slowing the quick loop down. It is in place
for the whole tier, module and session fixtures included."""
import multiprocessing.process
import os
import subprocess

import pytest
import torch.multiprocessing


def _refuse(*args, **kwargs):
    raise AssertionError("tests/unit starts no process (subprocess, launcher, mp.spawn, fork): move this test to "
                         "tests/system/")


@pytest.fixture(scope="package", autouse=True)
def no_processes():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", _refuse)
        patch.setattr(multiprocessing.process.BaseProcess, "start", _refuse)   # every context's Process
        patch.setattr(torch.multiprocessing, "spawn", _refuse)
        patch.setattr(torch.multiprocessing, "start_processes", _refuse)
        for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                patch.setattr(os, name, _refuse)
        yield
