"""The training entry point, as a module: `launch.py` (what users start) and `deepspeed --module
mmolre.launcher` (what `mmolre reshard` starts, which must not depend on where the repository is) run it.
"""
import os
import sys


def _threads_per_process() -> None:
    # Several ranks on one CPU host must not each start one thread per core.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))


def main(argv=None) -> int:
    from mmolre.distributed import fill_env
    fill_env()  # RANK/WORLD_SIZE/LOCAL_SIZE from the launcher, from srun's variables, or one process
    _threads_per_process()
    import torch
    from mmolre.config import ConfigError, parse_args
    from mmolre.data import DataError
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        cfg = parse_args(argv)
        from mmolre.train import NonFiniteLoss, train
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


def exit_without_teardown(code: int) -> int:
    """Leave the process once its work is done and written, skipping the interpreter's teardown: with the
    process group already destroyed, gloo has still been seen to abort a finished rank there ("terminate
    called without an active exception", exit -6, about once in 50 runs), which the launcher reports as a
    failed run, and Slurm then requeues a finished job."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(exit_without_teardown(main()))
