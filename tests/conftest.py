import os

# Before anything imports deepspeed: CPU accelerator, one thread per process, and a short
# process-group timeout so a distributed hang fails the test instead of stalling CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DEEPSPEED_TIMEOUT", "3")

import torch  # noqa: E402

torch.set_num_threads(1)
