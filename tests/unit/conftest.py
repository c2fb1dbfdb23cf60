"""The fast tier: no launcher, no subprocess, no spawned process. A test that needs one belongs in
tests/system/; this guard makes such a test fail here instead of slowing the quick loop down."""
import multiprocessing
import subprocess

import pytest
import torch.multiprocessing


def _refuse(*args, **kwargs):
    raise AssertionError("tests/unit starts no process (subprocess, launcher, mp.spawn): move this test to "
                         "tests/system/")


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
    monkeypatch.setattr(torch.multiprocessing, "spawn", _refuse)
    monkeypatch.setattr(multiprocessing.Process, "start", _refuse)
