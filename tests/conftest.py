import os

# Before anything imports deepspeed: CPU accelerator, one thread per process, and a short
# process-group timeout so a distributed hang fails the test instead of stalling CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DEEPSPEED_TIMEOUT", "3")
# No test downloads anything: a hub name fails at once instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT saved as a local model directory (tests/tiny_encoder.py)."""
    from tests.tiny_encoder import save_tiny_encoder
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))
