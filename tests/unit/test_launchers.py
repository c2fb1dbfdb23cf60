"""Rank discovery from Slurm's variables (`accelerate launch`: tests/system/test_launchers.py)."""
from mmolre.distributed import fill_env


def test_ranks_come_from_slurm_variables_under_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_TASKS_PER_NODE": "4(x2)", "MASTER_PORT": "29999"}
    fill_env(env)
    assert [env[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")] == ["5", "8", "1", "4"]


def test_a_batch_script_without_srun_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}   # the batch step itself has no SLURM_STEP_ID
    fill_env(env)
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0" and env["MASTER_PORT"]


def test_a_launcher_that_sets_ranks_wins():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1234", "SLURM_PROCID": "7",
           "SLURM_NTASKS": "9", "SLURM_STEP_ID": "0"}
    fill_env(env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
