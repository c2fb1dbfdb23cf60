"""Every collective of the trainer goes through mmolre/distributed.py, on the device its process group
communicates on, and runs at world size 1 too (so a single-GPU run exercises every collective path)."""
import os

import torch
import torch.multiprocessing as mp

from mmolre.distributed import free_port


def _comm_device_worker(backend: str, port: int, queue) -> None:
    import torch.distributed as dist
    from mmolre.distributed import comm_device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(1))
        cpu_tensor = "accepted"
    except RuntimeError as e:
        cpu_tensor = str(e)
    queue.put((str(comm_device(local_rank=3)), cpu_tensor))
    dist.destroy_process_group()


def _comm_device(backend: str):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_comm_device_worker, args=(backend, free_port(), queue))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(60)
    return result


def test_the_communication_device_follows_the_groups_backends():
    """A group with NCCL's device map ("cuda:nccl"; emulated here as "cuda:gloo") has no CPU backend and
    refuses a CPU tensor with the error every multi-GPU run used to hit; the helpers then communicate on
    the rank's GPU. A gloo group communicates on the CPU."""
    device, cpu_tensor = _comm_device("cuda:gloo")
    assert device == "cuda:3"
    assert "No backend type associated with device type cpu" in cpu_tensor
    assert _comm_device("gloo") == ("cpu", "accepted")


def _record_trainer_collectives(tmp: str, queue) -> None:
    """Run the trainer at world size 1 and record each collective our helpers issue, with its tensor's device."""
    import inspect

    import torch.distributed as dist
    os.environ.update(DS_ACCELERATOR="cpu", MMOLRE_CACHE=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1",
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)
    calls = []

    def recording(name, original):
        def call(*args, **kwargs):
            caller = inspect.stack()[1].frame.f_globals.get("__name__")
            if caller == "mmolre.distributed":
                tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
                calls.append((name, None if tensor is None else str(tensor.device)))
            return original(*args, **kwargs)
        return call

    for name in ("all_reduce", "all_gather_object", "gather_object", "broadcast_object_list", "barrier"):
        setattr(dist, name, recording(name, getattr(dist, name)))
    from mmolre.config import parse_args
    from mmolre.train import train
    cfg = parse_args(["--synthetic_scale", "0.02", "--d_model", "16", "--num_experts", "4", "--expert_rank", "4",
                      "--batch_size", "16", "--max_steps", "3", "--log_every", "1", "--output_dir",
                      os.path.join(tmp, "runs"), "--run_name", "one"])
    train(cfg)
    queue.put(calls)


def test_a_one_process_run_issues_every_collective_on_the_groups_device(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_record_trainer_collectives, args=(str(tmp_path), queue))
    proc.start()
    calls = queue.get(timeout=300)
    proc.join(60)
    names = {name for name, _ in calls}
    # the stop/NaN flags every micro batch, the logged losses and routing, evaluation's gather, selection's
    # broadcast, the checkpoint barriers: all of them run with one process as with many
    assert {"all_reduce", "gather_object", "broadcast_object_list", "barrier"} <= names, names
    assert sum(name == "all_reduce" for name, _ in calls) >= 3 * 2   # flags + log, each of 3 steps
    assert {device for name, device in calls if device is not None} == {"cpu"}   # gloo's device


def _stale_buffer_worker(rank: int, world: int, port: int, out: str) -> None:
    from tests.dist_helpers import setup
    info = setup(rank, world, port, timeout_s=15)   # a mismatched collective fails in 15 s, not 2 minutes
    from mmolre import distributed
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
    if rank == 0:   # a stale buffer file on one rank only (left by a killed run that used the same port)
        open(name, "w").close()
    distributed._unlink_shm_allreduce_buffer(info)
    order = distributed.all_gather(("after", rank), info)
    if rank == 0:
        torch.save({"order": order, "left": os.path.exists(name)}, out)
    distributed.shutdown(info)


def test_a_stale_shared_memory_file_on_one_rank_does_not_mismatch_collectives(tmp_path):
    out = tmp_path / "stale.pt"
    mp.spawn(_stale_buffer_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["order"] == [("after", 0), ("after", 1)] and not result["left"]
