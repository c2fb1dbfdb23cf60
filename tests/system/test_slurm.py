"""The slurm/ scripts under a real Slurm controller (tests/slurm/cluster.sh starts a one-node cluster).

CI installs and starts the cluster before the tests and sets MMOLRE_REQUIRE_SLURM=1, so there a missing
cluster is a failure; elsewhere these tests are skipped with the command that enables them.
"""
import glob
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.launcher import ROOT, TINY



def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.environ.get("MMOLRE_REQUIRE_SLURM") == "1":
            pytest.fail("MMOLRE_REQUIRE_SLURM=1 but no Slurm cluster answers (tests/slurm/cluster.sh start)")
        pytest.skip("no Slurm cluster: run `tests/slurm/cluster.sh install start` (as root) to enable")


def submit(tmp, script, *args, sbatch=(), env=None):
    exports = {"DS_ACCELERATOR": "cpu", "OUTPUT_DIR": str(tmp / "runs"), "MMOLRE_CACHE": str(tmp / "cache"),
               "DEEPSPEED_TIMEOUT": "2", **(env or {})}
    cmd = ["sbatch", "--parsable", "--chdir", ROOT, "--output", str(tmp / "slurm-%j.out"),
           "--ntasks-per-node=2", "--gpus-per-node=0",
           "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()), *sbatch, script, *TINY, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_states(job) -> list[str]:
    return job_field(job, "JobState")


# Reasons a pending job gives that will not clear by waiting (the job asks for what the cluster lacks).
HOPELESS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidQOS",
            "InvalidAccount", "ReqNodeNotAvail", "NodeDown")


def job_field(job, name) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return [f.split("=", 1)[1] for line in out.splitlines() for f in line.split() if f.startswith(f"{name}=")]


def wait_done(job, timeout=600, on_pending=None):
    start = time.time()
    while time.time() - start < timeout:
        states = job_states(job)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                          for s in states):
            return states
        if "PENDING" in states:
            hopeless = [r for r in job_field(job, "Reason") if r.split(",")[0] in HOPELESS]
            if hopeless:
                queue = subprocess.run(["squeue", "-j", job, "-o", "%i %T %r %C %D"], capture_output=True,
                                       text=True).stdout
                subprocess.run(["scancel", job])
                pytest.fail(f"job {job} pends for a reason that will not clear ({hopeless[0]}): it asks for more "
                            f"than the cluster has (sinfo: {_node_cpus()})\n{queue}")
            if on_pending:
                on_pending()
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not finish in {timeout} s: {job_states(job)}")


def _node_cpus() -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N CPUs=%c"], capture_output=True, text=True).stdout.strip()


def log_of(tmp, job):
    # errors="replace": several processes write into one log (progress bars included), and a write can cut
    # a multi-byte character
    return "\n".join(open(p, errors="replace").read() for p in glob.glob(str(tmp / f"slurm-{job}*.out")))


def test_single_node_script_trains_with_two_tasks(tmp_path):
    job = submit(tmp_path, "slurm/single_node.sbatch", "--epochs", "1")
    assert wait_done(job) == ["COMPLETED"], log_of(tmp_path, job)
    r = json.loads((tmp_path / "runs" / f"job{job}" / "results.json").read_text())
    assert r["world_size"] == 2 and r["ep_size"] == 2 and r["test"]["sentiment"]["mae"] > 0


def test_many_nodes_script_on_one_node_with_two_tasks(tmp_path):
    job = submit(tmp_path, "slurm/multi_node.sbatch", "--epochs", "1", sbatch=["--nodes=1"])
    assert wait_done(job) == ["COMPLETED"], log_of(tmp_path, job)
    r = json.loads((tmp_path / "runs" / f"job{job}" / "results.json").read_text())
    assert r["world_size"] == 2 and r["ep_size"] == 2


def test_sweep_array_and_report(tmp_path):
    """The grid, expert parallelism over every rank of the job from EP_ACROSS_NODES_FROM experts on (here 16;
    the smaller counts keep the `--ep_size 1` passed in), EXPERT_OPTIMIZER, and `mmolre report` of the array."""
    job = submit(tmp_path, "slurm/sweep_experts.sbatch", "--epochs", "1", "--ep_size", "1", sbatch=["--array=0-2"],
                 env={"EXPERTS": "4 8 16", "TOP_KS": "2", "EP_ACROSS_NODES_FROM": "16", "EXPERT_OPTIMIZER": "lazy"})
    assert set(wait_done(job)) == {"COMPLETED"}, log_of(tmp_path, job)
    runs = sorted(glob.glob(str(tmp_path / "runs" / f"sweep{job}_e*_k2_s1")))
    assert [os.path.basename(r) for r in runs] == [f"sweep{job}_e{e}_k2_s1" for e in (16, 4, 8)]
    configs = {r: json.loads((tmp_path / "runs" / r / "results.json").read_text()) for r in map(os.path.basename, runs)}
    assert [configs[f"sweep{job}_e{e}_k2_s1"]["ep_size"] for e in (4, 8, 16)] == [1, 1, 2]
    for r in runs:
        assert json.loads(open(os.path.join(r, "config.json")).read())["train"]["expert_optimizer"] == "lazy"
    out = subprocess.run(["mmolre", "report", *runs, "--plot", str(tmp_path / "sweep")], capture_output=True,
                         text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 4", "| 8", "| 16"]   # one row per expert count
    assert os.path.getsize(tmp_path / "sweep_heatmap.png") > 0
    assert os.path.getsize(tmp_path / "sweep_vs_experts.png") > 0


def preempt_and_resume(tmp_path, script, sbatch=(), epochs=4):
    """Submit, let the run start, send what Slurm sends before a preemption or the time limit, and let the
    requeued job finish; returns the job id, its log and the run's results."""
    job = submit(tmp_path, script, "--epochs", str(epochs), sbatch=sbatch)
    run = tmp_path / "runs" / f"job{job}"
    start = time.time()
    while not glob.glob(str(run / "tensorboard" / "events.*")):
        assert time.time() - start < 300, log_of(tmp_path, job)
        time.sleep(0.2)
    # What Slurm does before a preemption or the time limit with --signal=B:USR1@...
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    # A requeued job waits for an eligibility delay; shorten it. Not to zero: slurmd treats a credential
    # issued in the same second as the requeue's revocation as revoked and fails the job ("Job credential
    # revoked"), so the job is released once it has been pending for 2 s.
    pending_since = []

    def release():
        pending_since.append(time.time())
        if time.time() - pending_since[0] >= 2:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    assert wait_done(job, on_pending=release) == ["COMPLETED"], log_of(tmp_path, job)
    log = log_of(tmp_path, job)
    assert "USR1 received" in log and "stop requested (SIGUSR1)" in log and "requeueing job" in log
    assert f"restart 1 of job {job}" in log
    saved = int(log.split("saved ")[1].split(" at step ")[1].split(";")[0])
    assert f"resumed from {run}/checkpoints/step{saved:08d}: " in log
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in info
    return job, log, json.loads((run / "results.json").read_text())


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    _, _, r = preempt_and_resume(tmp_path, "slurm/single_node.sbatch")
    assert r["train"]["epochs"] == 4 and r["global_step"] == 4 * 20    # the global step continued


# ---- two hosts (partition `two`: the network namespaces of tests/cluster/nodes.sh, a slurmd each) ------
TWO_HOSTS = ["--partition=two", "--nodes=2"]
GROUPS = "expert-parallel groups (all-to-all): [0, 1] on mmolre-node0 | [2, 3] on mmolre-node1"


def test_many_nodes_script_on_two_hosts_with_two_tasks_each(tmp_path):
    job = submit(tmp_path, "slurm/multi_node.sbatch", "--epochs", "1", sbatch=TWO_HOSTS)
    assert wait_done(job) == ["COMPLETED"], log_of(tmp_path, job)
    log = log_of(tmp_path, job)
    assert GROUPS in log   # srun's ranks: 0, 1 on the first host, 2, 3 on the second; ep 2 stays in a host
    r = json.loads((tmp_path / "runs" / f"job{job}" / "results.json").read_text())
    assert r["world_size"] == 4 and r["ep_size"] == 2


def test_a_two_host_job_is_preempted_requeued_and_resumed_on_both_hosts(tmp_path):
    _, log, r = preempt_and_resume(tmp_path, "slurm/multi_node.sbatch", sbatch=TWO_HOSTS)
    assert log.count(GROUPS) == 2                                       # the first run and the resumed one
    assert r["world_size"] == 4 and r["train"]["epochs"] == 4 and r["global_step"] == 4 * 10


def test_a_job_the_cluster_cannot_run_fails_at_once_naming_the_reason(tmp_path):
    """Two tasks of all the node's CPUs each pend with Reason=PartitionConfig forever; the helper says so
    within seconds instead of waiting out its timeout."""
    cpus = int(_node_cpus().split("CPUs=")[1].split()[0])
    job = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--cpus-per-task={cpus}", "--output",
                          str(tmp_path / "never.out"), "--wrap", "true"], capture_output=True, text=True,
                         check=True).stdout.strip()
    start = time.time()
    with pytest.raises(pytest.fail.Exception, match="PartitionConfig"):
        wait_done(job, timeout=120)
    assert time.time() - start < 30
    assert job_states(job) in ([], ["CANCELLED"])
