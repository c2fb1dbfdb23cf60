"""The default run, as README's table shows it: `deepspeed --num_gpus 2 launch.py --ds_config ds_configs/zero2.json`.

    python bench/default_run.py                  run it and write bench/results/default_run.json (README's table:
                                                 python bench/doc_tables.py)
    python bench/default_run.py --check          run it and compare every metric with the committed record, to the
                                                 last digit; exit 1 naming what differs (nothing is written)
    python bench/default_run.py --run_dir DIR    record a finished run instead of running one

The record holds the command, the settings as the run recorded them (without its paths), the data by name
and hash, the metrics, the wall time and peak memory per process (`/usr/bin/time -v`), and the machine.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.commands import ROOT, passthrough_parser  # noqa: E402

COMMAND = ["deepspeed", "--num_gpus", "2", "launch.py", "--ds_config", "ds_configs/zero2.json"]
RECORD = os.path.join(ROOT, "bench", "results", "default_run.json")
METRICS = ("best_epoch", "global_step", "params", "valid", "test", "baselines", "emotion_decisions")
PATHS = {"data": ("data_path", "cache_dir"), "train": ("output_dir", "run_name", "ds_config")}   # one machine's


def run_default(run_dir: str) -> dict:
    """Run the default command into run_dir; returns {"wall_s", "peak_rss_gb"} from /usr/bin/time -v."""
    name = os.path.basename(run_dir)
    cmd = ["/usr/bin/time", "-v", *COMMAND, "--output_dir", os.path.dirname(run_dir), "--run_name", name]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the default run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(time.time() - start, 1), "peak_rss_gb": round(peak_kb / 1024 ** 2, 2)}


def record(run_dir: str, timing: dict | None) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        r = json.load(f)
    settings = {section: {k: v for k, v in values.items() if k not in PATHS.get(section, ())}
                for section, values in r["config"].items()}
    if settings["data"].get("emotion_labels"):   # a file: by name
        settings["data"]["emotion_labels"] = os.path.basename(settings["data"]["emotion_labels"])
    data = {name: {"source": os.path.basename(d["source"]), "sha256": d["sha256"], "splits": d["splits"]}
            for name, d in r["data"].items()}
    when = (f"wall time {timing['wall_s'] / 60:.0f} min {timing['wall_s'] % 60:.0f} s, peak memory "
            f"{timing['peak_rss_gb']} GB per process (/usr/bin/time -v), synthetic data already generated"
            if timing else "wall time not measured (recorded from a finished run)")
    return {"command": " ".join(COMMAND), "git_commit": r["git_commit"], "versions": r["versions"],
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "timing": when,
            "settings": settings, "data": data, "synthetic": r["synthetic"], "world_size": r["world_size"],
            "ep_size": r["ep_size"], "num_experts": r["num_experts"], "top_k": r["top_k"], "seed": r["seed"],
            "train": r["train"], **{k: r[k] for k in METRICS}}


def differences(new: dict, old: dict) -> list[str]:
    """The metrics (and what they depend on) in which two records differ."""
    keys = ("settings", "data", "world_size", "ep_size", *METRICS)
    return [f"{k}: {json.dumps(old.get(k))[:200]} -> {json.dumps(new.get(k))[:200]}" for k in keys
            if new.get(k) != old.get(k)]


def main(argv=None) -> int:
    parser = passthrough_parser(__doc__)
    parser.add_argument("--check", action="store_true", help="compare with the committed record; write nothing")
    parser.add_argument("--run_dir", help="a finished default run to record instead of running one")
    args = parser.parse_args(argv)
    timing = None
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = os.path.join(ROOT, "runs", f"default_run-{time.strftime('%Y%m%d-%H%M%S')}")
        timing = run_default(run_dir)
    new = record(run_dir, timing)
    if args.check:
        with open(RECORD) as f:
            diff = differences(new, json.load(f))
        print("\n".join(diff) if diff else f"the default run reproduces {os.path.relpath(RECORD, ROOT)} exactly")
        return 1 if diff else 0
    with open(RECORD, "w") as f:
        json.dump(new, f, indent=1)
    print(f"wrote {os.path.relpath(RECORD, ROOT)} ({new['timing']}); update the docs: python bench/doc_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
