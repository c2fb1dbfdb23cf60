"""Several nodes: DeepSpeed's multi-node launch (a hostfile, one `deepspeed --no_ssh --node_rank N` per node),
here with both nodes on this host, and what happens when the nodes do not share the checkpoint directory."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.launcher import ROOT, TINY, environment, free_port


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
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=environment(tmp), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


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
