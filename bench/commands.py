"""The command lines the benchmarks accept and record.

A benchmark's result file records the command that made it, so anyone can run it again. It records the
command as typed from the repository, with the repository's own paths made relative: never one machine's
directories. A benchmark passes the flags it does not know to launch.py, never taking one as an
abbreviation of its own. Flags that a benchmark sets itself for each run are refused when passed through to launch.py,
so that a run and its name say the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_line(script: str, argv: list[str] | None) -> str:
    """`python bench/SCRIPT ARGS`, shell-quoted, absolute paths inside the repository made relative
    (`--out=/x/repo/bench/results/a` -> `--out=bench/results/a`)."""
    args = sys.argv[1:] if argv is None else argv

    def relative(arg: str) -> str:
        flag, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if os.path.isabs(value) and os.path.realpath(value).startswith(os.path.realpath(ROOT) + os.sep):
            value = os.path.relpath(os.path.realpath(value), os.path.realpath(ROOT))
        return flag + eq + value
    return f"python bench/{os.path.basename(script)} " + shlex.join(relative(a) for a in args)


def passthrough_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a benchmark that passes the flags it does not know to launch.py. Never by abbreviation:
    with argparse's default, launch.py's `--seed 3` would be taken as this script's `--seeds 3`."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def refuse_owned_flags(parser: argparse.ArgumentParser, extra: list[str], owned: set[str], why: str) -> None:
    """parser.error if the launch.py flags passed through (`extra`) set one that the benchmark owns."""
    clash = sorted({a.split("=")[0] for a in extra} & owned)
    if clash:
        parser.error(f"{' '.join(extra)}: {', '.join(clash)} {why}")


def write_result(out: str, report: dict, lines: list[str]) -> None:
    """A benchmark's record: OUT.json (`report`) and OUT.md (`lines`, which are also printed)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
