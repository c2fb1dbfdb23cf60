"""Several nodes: DeepSpeed's multi-node launch (a hostfile, one `deepspeed --no_ssh --node_rank N` per node),
here with both nodes on this host, and what happens when the nodes do not share the checkpoint directory."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.launcher import ROOT, TINY, environment, final_weights, free_port, results, run_deepspeed
from tests.launcher import scalars


def launch_nodes(tmp, args, ranks_per_node=1, private_runs_on=(), timeout=300):
    """Start one DeepSpeed launcher per node of a 2-node hostfile; returns [(returncode, output)] per node.
    Nodes listed in private_runs_on see their own, empty --output_dir (a tmpfs in a mount namespace of their
    own), as on hosts without a shared file system."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("".join(f"node{n} slots={ranks_per_node}\n" for n in range(2)))
    runs = tmp / "runs"
    runs.mkdir(exist_ok=True)
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "launch.py",
               *TINY, "--output_dir", str(runs), *args]
        if node in private_runs_on:
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs tmpfs "{runs}" && exec "$@"', "sh", *cmd]
        procs.append(start(cmd, tmp / f"node{node}.log", tmp))
    return [(finish(p, timeout), (tmp / f"node{n}.log").read_text()) for n, p in enumerate(procs)]


def start(cmd, log, tmp):
    """A node's launcher, writing to a file (a pipe could fill up and stall it), in a session of its own."""
    return subprocess.Popen(cmd, cwd=ROOT, env=environment(tmp), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc, timeout) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)   # the whole launcher session, ranks included
        raise


def needs_root():
    """Namespaces need root. CI runs as root and sets MMOLRE_REQUIRE_SLURM=1 (it starts Slurm too): there a
    missing capability fails; elsewhere the test is skipped, saying why."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        if os.environ.get("MMOLRE_REQUIRE_SLURM") == "1":
            pytest.fail("these tests need root and util-linux's unshare (as in CI)")
        pytest.skip("needs root and unshare (namespaces)")


def test_nodes_that_do_not_share_the_checkpoint_directory_stop_at_the_first_save(tmp_path):
    needs_root()
    (code0, out0), (code1, out1) = launch_nodes(tmp_path, ["--run_name", "split", "--epochs", "1"],
                                                private_runs_on=(1,))
    assert code0 != 0 and code1 != 0, (out0[-2000:], out1[-2000:])
    for out in (out0, out1):
        assert "the ranks do not see each other's checkpoint files" in out, out[-3000:]
        assert "rank 0 on" in out and "sees no files of rank(s) [1]" in out
        assert "must be on a file system every rank shares" in out
    assert not list((tmp_path / "runs" / "split" / "checkpoints").glob("*/mmolre_complete.json"))


# ---- two hosts: network namespaces with their own addresses and hostnames (tests/cluster/nodes.sh) ------
NODES = os.path.join(ROOT, "tests", "cluster", "nodes.sh")
# No dropout and no aux loss (both per rank), so 4 ranks x micro 4 and 1 process x micro 16 train on the
# same 16 samples per step and must follow the same trajectory.
SAME = ["--dropout", "0", "--aux_loss_weight", "0", "--epochs", "1", "--max_steps", "6", "--log_every", "1"]


@pytest.fixture(scope="module")
def two_hosts():
    """The two hosts, brought up here unless they already are (tests/slurm/cluster.sh keeps them up for its
    slurmds); removed afterwards only if brought up here."""
    needs_root()
    already = "mmolre-node0" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    subprocess.run([NODES, "up"], check=True, capture_output=True)
    yield ["mmolre-node0", "mmolre-node1"]
    if not already:
        subprocess.run([NODES, "down"], check=True, capture_output=True)


def launch_on_hosts(tmp, args, ranks_per_node=2, timeout=300):
    """One `deepspeed --no_ssh --node_rank N` per host, each inside its host's namespace."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("".join(f"mmolre-node{n} slots={ranks_per_node}\n" for n in range(2)))
    port = free_port()
    procs = [start([NODES, "run", str(node), sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile",
                    str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "mmolre-node0",
                    "--master_port", str(port), "launch.py", *TINY, "--output_dir", str(tmp / "runs"), *args],
                   tmp / f"host{node}.log", tmp) for node in range(2)]
    codes = [finish(p, timeout) for p in procs]
    outs = [(tmp / f"host{node}.log").read_text() for node in range(2)]
    for code, out in zip(codes, outs):
        assert code == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    run_deepspeed(tmp, "--run_name", "one", "--batch_size", "16", *SAME, procs=1)
    return tmp / "runs" / "one"


@pytest.mark.parametrize("ep_size, groups", [
    (0, "[0, 1] on mmolre-node0 | [2, 3] on mmolre-node1"),
    (4, "[0, 1, 2, 3] across mmolre-node0 (0, 1), mmolre-node1 (2, 3)")],
    ids=["default-ep-within-a-node", "ep4-across-nodes"])
def test_two_hosts_with_two_ranks_each_train_like_one_process(two_hosts, one_process, tmp_path, ep_size, groups):
    node0, _ = launch_on_hosts(tmp_path, ["--run_name", "two", "--batch_size", "4", "--ep_size", str(ep_size), *SAME])
    assert f"expert-parallel groups (all-to-all): {groups}" in node0
    run = tmp_path / "runs" / "two"
    assert results(run)["world_size"] == 4 and results(run)["ep_size"] == (ep_size or 2)
    for tag in ("loss/total", "loss/sentiment", "train/grad_norm", "train/lr"):
        mine, ref = dict(scalars(run, tag)), dict(scalars(one_process, tag))
        assert sorted(mine) == sorted(ref) == [1, 2, 3, 4, 5, 6], tag
        assert [mine[s] for s in sorted(mine)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-4), tag
    (_, a), (_, b) = final_weights(run), final_weights(one_process)
    # The losses and norms above are the exact check. The weights differ by reduction order only, but
    # without an aux loss the routers' last layer gets tiny gradients, whose rounding noise Adam turns into
    # steps of up to ~lr/10 (seen: 1e-4 on a router bias); anything else is within ~1e-5.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=3e-4, msg=lambda m: f"{key}: {m}")


def test_the_two_hosts_come_up_once_and_leave_nothing_behind(tmp_path):
    """A separate pair (its own prefix and subnet, so the pair the Slurm cluster may be using is untouched):
    `up` twice makes one pair, `down` removes namespaces, links and /etc/hosts lines."""
    needs_root()
    env = {**os.environ, "MMOLRE_NODES_PREFIX": "mmtest", "MMOLRE_NODES_NET": "10.79.0"}

    def state():
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        hosts = open("/etc/hosts").read()
        return ([n.split()[0] for n in netns.splitlines() if n.startswith("mmtest")],
                sorted(l.split(":")[1].strip().split("@")[0] for l in links.splitlines() if "mmtest" in l),
                [h for h in hosts.splitlines() if "mmtest" in h])
    try:
        for _ in range(2):
            subprocess.run([NODES, "up"], env=env, check=True, capture_output=True)
        netns, links, hosts = state()
        assert sorted(netns) == ["mmtest-node0", "mmtest-node1"]
        assert links == ["mmtest-br", "mmtest-h0", "mmtest-h1"]
        assert hosts == ["10.79.0.1 mmtest-node0 # mmtest test node", "10.79.0.2 mmtest-node1 # mmtest test node"]
        hostname = subprocess.run([NODES, "run", "1", "hostname"], env=env, capture_output=True, text=True).stdout
        assert hostname.strip() == "mmtest-node1"
    finally:
        subprocess.run([NODES, "down"], env=env, check=True, capture_output=True)
    assert state() == ([], [], [])
