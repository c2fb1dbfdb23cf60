"""Process groups, rank discovery and the expert-parallel size rule (DESIGN.md §4)."""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_env(env=None) -> None:
    """Make RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* exist in `env` (default os.environ): from Slurm's variables
    in a task started by srun, or a single process when started without any launcher (DeepSpeed would
    otherwise try mpi4py)."""
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # a task started by srun: "2(x3)" in SLURM_TASKS_PER_NODE means 2 tasks on each of 3 nodes
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("LOCAL_SIZE", env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; use the deepspeed launcher, "
                               "torchrun or the slurm/ scripts")
        env["MASTER_PORT"] = str(free_port())


def init(timeout_s: float | None = None) -> DistInfo:
    """Create the process group. A collective that waits longer than timeout_s (default: env
    DEEPSPEED_TIMEOUT minutes, else 10 minutes) for a missing rank fails instead of hanging."""
    fill_env()
    import deepspeed  # after fill_env, so DeepSpeed finds every variable it needs
    if timeout_s is None:
        timeout_s = float(os.environ.get("DEEPSPEED_TIMEOUT", "10")) * 60
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)
    info = DistInfo(dist.get_rank(), int(os.environ["LOCAL_RANK"]), world, local_world)
    _unlink_shm_allreduce_buffer(info)
    return info


def _unlink_shm_allreduce_buffer(info: DistInfo) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (69 MB per rank) and never unlinks it, so every run leaves its buffers behind until
    /dev/shm, which is RAM, runs out (seen here after a few hundred runs). Every rank maps all peers'
    buffers inside init_distributed; once all ranks are past it, the names can go and the mappings stay."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{info.rank}")
    if not os.path.exists(name):
        return
    barrier(info)
    try:
        os.unlink(name)
    except OSError:
        pass


def choose_ep_size(requested: int, world_size: int, num_experts: int, ranks_per_node: int) -> int:
    """The requested size after checks, or the largest size that divides both the world size and the
    expert count and fits in one node (so the all-to-all stays inside a node when it can)."""
    if requested:
        if world_size % requested:
            raise ValueError(f"--ep_size {requested} does not divide the world size {world_size}")
        if num_experts % requested:
            raise ValueError(f"--num_experts {num_experts} is not divisible by --ep_size {requested}")
        return requested
    limit = math.gcd(world_size, num_experts)
    return max(e for e in range(1, limit + 1) if limit % e == 0 and e <= max(1, ranks_per_node))


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """DeepSpeed's default layout puts consecutive ranks in one expert-parallel group."""
    return rank % ep_size


def gather_to_main(obj, info: DistInfo):
    """All ranks' objects as a list on rank 0 (None elsewhere)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj, info: DistInfo) -> list:
    """Every rank's object, on every rank."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj, info: DistInfo):
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(info: DistInfo) -> None:
    """Meet, then destroy the process group, for workers that end right after their last collective
    (torch.multiprocessing.spawn in the tests): left to interpreter teardown, gloo's threads sometimes
    abort such a process ("terminate called without an active exception") after its work is done."""
    if dist.is_available() and dist.is_initialized():
        barrier(info)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()
