"""The README documents every flag, and CI runs exactly the README's test command."""
import os
import re

from mmolre.config import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_every_flag_is_in_the_readme_flag_table():
    readme = _read("README.md")
    flags = [a.option_strings[0] for a in build_parser()._actions
             if a.option_strings and a.help != "==SUPPRESS==" and a.option_strings[0] != "-h"]
    missing = [f for f in flags if f"| `{f}` |" not in readme]
    assert not missing, f"flags missing from README's table: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    command = re.search(r"pip install -e \"\.\[test[^\]]*\]\" && (python -m pytest[^\n`]*)", readme).group(1).strip()
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command in ci_lines


def test_ds_configs_set_clipping_and_tensorboard():
    import json
    for name in ("zero0.json", "zero1.json", "zero2.json", "zero2_bf16.json"):
        cfg = json.loads(_read("ds_configs", name))
        assert "gradient_clipping" in cfg and "tensorboard" in cfg, name
        assert "optimizer" not in cfg and "scheduler" not in cfg, name
