"""The docs say what the code does: every flag is documented, CI runs exactly the README's test command, the
result tables are the benchmarks' own, and every test, file and page the docs name exists."""
import glob
import os
import re
import sys

from mmolre.config import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_every_flag_is_in_the_flag_table():
    flags_page = _read("docs", "flags.md")
    flags = [a.option_strings[0] for a in build_parser()._actions
             if a.option_strings and a.help != "==SUPPRESS==" and a.option_strings[0] != "-h"]
    missing = [f for f in flags if f"| `{f}` |" not in flags_page]
    assert not missing, f"flags missing from docs/flags.md's table: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    command = re.search(r"pip install -e \"\.\[test[^\]]*\]\" && (python -m pytest[^\n`]*)", readme).group(1).strip()
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command in ci_lines


def test_ds_configs_set_clipping_and_leave_tensorboard_to_the_trainer():
    import json
    for name in ("zero0.json", "zero1.json", "zero2.json", "zero2_bf16.json"):
        cfg = json.loads(_read("ds_configs", name))
        assert "gradient_clipping" in cfg and "tensorboard" not in cfg, name
        assert "optimizer" not in cfg and "scheduler" not in cfg, name


def test_the_readme_is_short_and_points_to_every_topic_page():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 300
    assert DOCS
    unlinked = [os.path.basename(d) for d in DOCS if f"(docs/{os.path.basename(d)})" not in readme]
    assert not unlinked, f"docs pages the README's index does not name: {unlinked}"


def test_result_tables_are_the_benchmarks_own():
    """Each generated block equals what bench/doc_tables.py renders from bench/results/ now."""
    sys.path.insert(0, ROOT)
    from bench import doc_tables
    assert doc_tables.sync(check=True) == [], "stale tables: run python bench/doc_tables.py"
    blocks = sum(len(doc_tables.BLOCK.findall(_read(p))) for p in ["README.md", *DOCS])
    assert blocks >= 10


def test_every_test_the_docs_name_exists():
    tests = {}
    for path in glob.glob(os.path.join(ROOT, "tests", "*", "test_*.py")):
        tests[os.path.relpath(path, os.path.join(ROOT, "tests"))] = re.findall(r"^def (test_\w+)", _read(path), re.M)
    named = [(m.group(1), m.group(2)) for p in ["README.md", *DOCS]
             for m in re.finditer(r"(?:tests/)?((?:unit|system)/test_\w+\.py)(?:::([\w*]+))?", _read(p))]
    assert len(named) > 20
    wrong = []
    for file, name in named:
        if file not in tests:
            wrong.append(file)
        elif name and not any(re.fullmatch(name.replace("*", ".*"), t) for t in tests[file]):
            wrong.append(f"{file}::{name}")
    assert not wrong, f"the docs name tests that do not exist: {wrong}"


def test_every_repository_file_the_docs_link_exists():
    missing = []
    for page in ["README.md", *DOCS]:
        base = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", _read(page)):
            if not target.startswith("http") and not os.path.exists(os.path.join(base, target)):
                missing.append(f"{page}: {target}")
    assert not missing, missing
