"""Reusing a benchmark's finished runs only when they were made with the settings asked for now.

The benchmarks skip a (variant, seed) whose run directory already holds results.json, so an interrupted
study resumes where it stopped. A run made under other settings must not be counted as this command's:
other flags, defaults that changed since (such as --dropout), another world size, another resolved
DeepSpeed config, or other data under the same file name. Such a run is refused, naming the run and what
differs, and left as it is.

Not compared: the code (a run made by an older commit with the same settings is reused; results.json
records its `git_commit`), and the data's content where the run recorded no hash or the file is gone.
"""
from __future__ import annotations

import copy
import json
import os

from mmolre.config import parse_args, recorded_section
from mmolre.data.cache import file_sha256
from mmolre.engine import load_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the benchmarks launch from here
# Where a run lives, how it was started and how often it logs or saves: not settings of what it trained.
NOT_SETTINGS = {"train": {"output_dir", "run_name", "resume", "reshard_only", "log_every", "save_every",
                          "keep_checkpoints", "dist_timeout"},
                "data": {"cache_dir"}}
# Paths, compared as the files they name (the trainer records some of them made absolute).
PATHS = {("train", "ds_config"), ("model", "text_encoder"), ("data", "data_path")}
MONITORS = ("tensorboard", "csv_monitor", "wandb", "comet")   # pointed at each run's own directory


class StaleRunError(RuntimeError):
    """A finished run whose recorded settings are not the ones asked for."""


def _file(path: str | None) -> str | None:
    return None if path is None else os.path.realpath(os.path.join(ROOT, path))


def finished_run(run_dir: str, launch_args: list[str], world_size: int) -> bool:
    """True if run_dir holds a finished run of `launch.py *launch_args` on `world_size` processes (today's
    defaults filling the rest); False if it holds no finished run; StaleRunError if it holds one made
    with other settings."""
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_path):
        return False
    record = os.path.join(run_dir, "config.json")
    with open(record) as f:
        saved = json.load(f)
    with open(results_path) as f:
        results = json.load(f)
    cfg = parse_args(launch_args, world_size=world_size)
    differences = []
    for section, settings in cfg.to_dict().items():
        saved_section = recorded_section(section, saved.get(section, {}))   # flags added since: as the run behaved
        for key, value in settings.items():
            if key in NOT_SETTINGS.get(section, ()) or (key, cfg.model.eval_capacity_factor) == ("eval_batch_size", 0):
                continue   # without an evaluation capacity the evaluation batch regroups forwards, nothing else
            if key not in saved_section:
                differences.append(f"--{key}: not recorded there (an older version's run), {value!r} now")
                continue
            had = saved_section[key]
            same = _file(had) == _file(value) if (section, key) in PATHS and had != value else had == value
            if not same:
                differences.append(f"--{key}: {had!r} there, {value!r} now")
    if results.get("world_size") != world_size:
        differences.append(f"world size {results.get('world_size')} there, {world_size} now")
    cfg.train.ds_config = _file(cfg.train.ds_config)
    wanted_ds = load_ds_config(cfg.train, world_size, on_gpu=True)   # as the trainer resolves it (the
    had_ds = copy.deepcopy(saved.get("ds_config", {}))                # fp16-on-CPU check is not ours here)
    for monitor in MONITORS:
        wanted_ds.pop(monitor, None), had_ds.pop(monitor, None)
    if had_ds != wanted_ds:
        differences.append(f"the resolved DeepSpeed config: {had_ds} there, {wanted_ds} now")
    data_path = cfg.data.data_path
    recorded = [d.get("sha256") for d in results.get("data", {}).values() if d.get("sha256")]
    if data_path and recorded and os.path.isfile(_file(data_path)) and file_sha256(_file(data_path)) not in recorded:
        differences.append(f"--data_path {data_path}: the file's content changed since the run")
    if differences:
        raise StaleRunError(f"{run_dir} holds a finished run made with other settings ({record}): "
                            + "; ".join(differences) + ". Move or delete it, or choose another output directory, "
                            "to run it again with the settings asked for now.")
    return True
