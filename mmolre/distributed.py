"""Process groups, rank discovery, the expert-parallel size rule (DESIGN.md §4), and every collective the
trainer runs.

The trainer's collectives live here and nowhere else in `mmolre/` (a test enforces it; the MoE layer's own
exchanges in `model/grouped.py` and its gate's capacity agreement in `model/sparse_gating.py` run on the
model's device and are the exceptions). Each helper moves its
tensor to the device the process group communicates on (`DistInfo.device`: the rank's GPU under NCCL,
whose group has no CPU backend, the CPU under gloo) and back, and runs its collective at world size 1 too,
so a single-GPU run exercises the same code paths as a multi-GPU one.
"""
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
    device: torch.device = torch.device("cpu")   # where collectives' tensors must live

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
    from deepspeed.accelerator import get_accelerator
    if timeout_s is None:
        timeout_s = float(os.environ.get("DEEPSPEED_TIMEOUT", "10")) * 60
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        # Before the group exists: NCCL binds each rank to the current device, and object collectives
        # use it too; left at device 0, every rank of a node would share one GPU.
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)
    info = DistInfo(dist.get_rank(), local_rank, world, local_world, comm_device(local_rank))
    _unlink_shm_allreduce_buffer(info)
    return info


def comm_device(local_rank: int, group=None) -> torch.device:
    """The device a process group's collectives take tensors on: the CPU when the group has a CPU backend
    (gloo: "cpu:gloo,cuda:gloo"), otherwise this rank's accelerator (NCCL: "cuda:nccl", which rejects a
    CPU tensor with "No backend type associated with device type cpu")."""
    device_types = [part.split(":")[0] for part in dist.get_backend_config(group).split(",")]
    if "cpu" in device_types:
        return torch.device("cpu")
    return torch.device(device_types[0], local_rank)


def _unlink_shm_allreduce_buffer(info: DistInfo) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (69 MB per rank) and never unlinks it, so every run leaves its buffers behind until
    /dev/shm, which is RAM, runs out (seen here after a few hundred runs). Every rank maps all peers'
    buffers inside init_distributed; once all ranks are past it, the names can go and the mappings stay."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{info.rank}")
    # Every rank meets here whether or not its file exists (a rank that returned early would pair this
    # barrier with some later collective of the others).
    barrier(info)
    try:
        os.unlink(name)
    except OSError:   # not on this rank: a GPU run, another user's buffer name, or already gone
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
    per_node = max(1, ranks_per_node)
    # groups are consecutive ranks: a size that divides the ranks of a node keeps every group inside one
    return max(e for e in range(1, limit + 1) if limit % e == 0 and per_node % e == 0)


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """DeepSpeed's default layout puts consecutive ranks in one expert-parallel group."""
    return rank % ep_size


def describe_expert_parallel_groups(world_size: int, ep_size: int, hosts: list[str]) -> str:
    """Which ranks exchange rows by all-to-all, and on which hosts (DeepSpeed's layout: consecutive ranks),
    e.g. "[0, 1] on node0 | [2, 3] on node1", or "[0, 1, 2, 3] across node0 (0, 1), node1 (2, 3)"."""
    parts = []
    for start in range(0, world_size, ep_size):
        ranks = list(range(start, start + ep_size))
        on = {}
        for r in ranks:
            on.setdefault(hosts[r], []).append(r)
        if len(on) == 1:
            parts.append(f"{ranks} on {hosts[start]}")
        else:
            parts.append(f"{ranks} across " + ", ".join(f"{h} ({', '.join(map(str, rs))})" for h, rs in on.items()))
    return " | ".join(parts)


def print_main(info: DistInfo, *parts) -> None:
    """Print on rank 0 only (every rank runs the same code; one copy of each message is enough)."""
    if info.is_main:
        print(*parts, flush=True)


def _live() -> bool:
    return dist.is_available() and dist.is_initialized()


def _single(info: DistInfo) -> bool:
    """True where no process group exists (export, predict, unit tests): only a world of 1 gets here."""
    if _live():
        return False
    assert info.world_size == 1, "a collective of a multi-process run needs its process group"
    return True


def gather_to_main(obj, info: DistInfo):
    """All ranks' objects as a list on rank 0 (None elsewhere)."""
    if _single(info):
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj, info: DistInfo) -> list:
    """Every rank's object, on every rank."""
    if _single(info):
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj, info: DistInfo):
    if _single(info):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum", group=None) -> torch.Tensor:
    """A new tensor holding the reduction of `t` over `group` (default: all ranks), on t's own device.
    The collective runs on the group's communication device, whatever device `t` is on."""
    reduced = t.detach().to(info.device, copy=True)
    if not _single(info):
        dist.all_reduce(reduced, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return reduced.to(t.device)


def all_reduce_sum(t: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    return all_reduce(t, info, "sum", group)


def shutdown(info: DistInfo) -> None:
    """Meet, then destroy the process group, at the end of every run: left to interpreter teardown, gloo's
    threads sometimes abort a process after its work is done ("terminate called without an active
    exception", exit -6), which fails a run that had finished."""
    if _live():
        barrier(info)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if _single(info):
        return
    if dist.get_backend() == "nccl":  # name the device, so NCCL does not guess one
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()
