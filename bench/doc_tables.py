"""Result tables in README.md and docs/ come from bench/results/, never copied by hand.

A table in a markdown file is a block between two markers:

    <!-- table: bench/results/real_labels.md -->                 the whole result file (a benchmark's markdown)
    <!-- table: bench/results/real_labels.md?section=MOSEI -->   its part under the heading that starts "MOSEI"
    <!-- table: bench/results/moe_block_cpu.txt?table=1 -->      its first markdown table
    <!-- table: default_run -->                                   rendered from bench/results/default_run.json
    ...
    <!-- /table -->

    python bench/doc_tables.py            rewrite every block from its source
    python bench/doc_tables.py --check    exit 1 naming each block that differs (tests/unit/test_docs.py runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", "docs/*.md"]
BLOCK = re.compile(r"(<!-- table: (?P<source>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
SENTIMENT = ("has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae", "corr")


def documents() -> list[str]:
    import glob
    return [p for pattern in DOCUMENTS for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]


def _section(text: str, heading: str, source: str) -> str:
    """The lines under the first heading that starts with `heading`, up to the next heading of its level or
    higher (the heading line itself left out)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+) (.*)$", line)
        if m and m.group(2).startswith(heading):
            level = len(m.group(1))
            end = next((j for j in range(i + 1, len(lines))
                        if (h := re.match(r"^(#+) ", lines[j])) and len(h.group(1)) <= level), len(lines))
            return "\n".join(lines[i + 1:end]).strip("\n")
    raise SystemExit(f"{source}: no heading starting with {heading!r}")


def default_run() -> str:
    """The default run's test tables, from the record bench/default_run.py writes."""
    with open(os.path.join(ROOT, "bench", "results", "default_run.json")) as f:
        run = json.load(f)
    s, base, emo = run["test"]["sentiment"], run["baselines"], run["test"].get("emotion")
    lines = [f"`{run['command']}` ({run['world_size']} processes, expert parallelism {run['ep_size']}, "
             f"{run['num_experts']} experts, top-{run['top_k']}; best epoch {run['best_epoch']}; "
             f"{run['machine']}):", "",
             "| split | Has0 Acc-2 | Has0 F1 | Non0 Acc-2 | Non0 F1 | Acc-5 | Acc-7 | MAE | Corr |",
             "|---|---|---|---|---|---|---|---|---|",
             "| test, MMoLRE | " + " | ".join(f"{s[k]:.4f}" for k in SENTIMENT) + " |",
             f"| test, trivial baselines | | | {base['majority_non0_acc2']:.4f} (majority sign) | | | | "
             f"{base['mean_mae']:.4f} (train mean) | |"]
    if emo:
        d = run["emotion_decisions"]

        def row(name, e):
            return (f"| {name} | {e['micro_f1']:.4f} | {e['jaccard_acc']:.4f} | {e['mean_wacc']:.4f} | "
                    f"{e['mean_wf1']:.4f} |")
        lines += ["", "| emotions (test) | micro-F1 | Jaccard acc | mean balanced acc | mean weighted F1 |",
                  "|---|---|---|---|---|", row("MMoLRE (threshold 0.5)", emo),
                  row("MMoLRE, one threshold chosen on valid", d["test_single_threshold"]),
                  row("MMoLRE, per-emotion thresholds chosen on valid", d["test_per_emotion_thresholds"]),
                  row("best constant set (valid)", d["baselines"]["best_constant"]),
                  f"| per-emotion majority class | {base['majority_emotion_micro_f1']:.4f} | "
                  f"{base['majority_emotion_jaccard_acc']:.4f} | | |"]
    t = run["train"]
    lines += ["", f"Training {t['seconds']:.0f} s at {t['samples_per_s']:.0f} samples/s over both processes; "
                  f"{run['params']['total']:,} parameters, {run['params']['expert']:,} of them in shared experts; "
                  f"{run['timing']}."]
    return "\n".join(lines)


def moe_block_measures() -> str:
    """The flatness and speed-up ratios of `bench/moe_block.py`'s record, ours beside DeepSpeed's layer."""
    with open(os.path.join(ROOT, "bench", "results", "moe_block_cpu.json")) as f:
        m = json.load(f)
    rows = [("`flat_128_vs_8` (time at 128 experts / at 8)", m["flat_128_vs_8"], m["stock_flat_128_vs_8"]),
            ("`flat_512_vs_8`", m["flat_512_vs_8"], m["stock_flat_512_vs_8"]),
            ("`speedup_vs_dense_128`, against the one-wide-matmul dense", m["speedup_vs_dense_128"],
             m["stock_speedup_vs_dense_128"]),
            ("`speedup_vs_dense_loop_128`, against the loop-over-experts dense", m["speedup_vs_dense_loop_128"], None),
            ("`fraction_of_peak_128` (useful FLOPs / matmul peak)", m["fraction_of_peak_128"], None)]
    lines = ["| measure | ours | DeepSpeed as it comes |", "|---|---|---|"]
    lines += [f"| {name} | {ours:.3g} | {'' if stock is None else f'{stock:.3g}'} |" for name, ours, stock in rows]
    return "\n".join(lines)


def _records(*names: str) -> list[dict]:
    runs = []
    for name in names:
        with open(os.path.join(ROOT, "bench", "results", name)) as f:
            runs += json.load(f)
    return runs


def _mean(rs: list[dict], key: str, digits: int) -> str:
    values = [r[key] for r in rs if r.get(key) is not None]
    return f"{statistics.fmean(values):.{digits}f}" if values else "—"


def _spread(rs: list[dict], key: str) -> str:
    """Mean ± sample std (one run has no spread to show)."""
    values = [r[key] for r in rs if r.get(key) is not None]
    return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def routing_study() -> str:
    """The routing study's headline columns, mean over seeds (± sample std for accuracy), from its record."""
    groups: dict = {}
    for r in _records("routing_study.json"):
        groups.setdefault((r["balance"], r["num_experts"], r["top_k"]), []).append(r)
    lines = ["| balance | experts | top-k | seeds | dev loss | test MAE | test emotion micro-F1 | load max/mean | "
             "dead experts (all layers) | divergence excess | sentiment MI excess | stability | largest combine "
             "weight | samples/s |", "|" + "---|" * 14]
    for (balance, experts, k), rs in sorted(groups.items()):
        lines.append(f"| {balance} | {experts} | {k} | {len(rs)} | {_spread(rs, 'valid.loss')} | "
                     f"{_spread(rs, 'test.sentiment.mae')} | {_spread(rs, 'test.emotion.micro_f1')} | "
                     f"{_mean(rs, 'routing.summary.load_max_over_mean', 1)} | "
                     f"{_mean(rs, 'routing.summary.dead_experts', 0)} | "
                     f"{_mean(rs, 'routing.summary.task_divergence_excess', 2)} | "
                     f"{_mean(rs, 'routing.summary.sentiment_label_mi_excess', 2)} | "
                     f"{_mean(rs, 'routing.summary.stability', 2)} | "
                     f"{_mean(rs, 'routing.summary.max_combine_weight', 2)} | "
                     f"{_mean(rs, 'train.samples_per_s', 0)} |")
    return "\n".join(lines)


ROUTE_STUDY = ("route_study.json", "route_study_16k.json")


def route_study() -> str:
    """The routing-granularity study (utterance against step routing), mean over seeds, from its record."""
    groups: dict = {}
    for r in _records(*ROUTE_STUDY):
        groups.setdefault((r["route_per"], r["balance"], r["num_experts"], r["top_k"]), []).append(r)
    lines = ["| route per | balance | experts | top-k | seeds | dev loss | test MAE | test emotion micro-F1 | train load "
             "max/mean | dead experts (all layers) | sentiment MI excess | stability | samples/s |", "|" + "---|" * 13]
    order = {"utterance": 0, "step": 1}
    for (route, balance, experts, k), rs in sorted(groups.items(), key=lambda g: (order[g[0][0]], *g[0][1:])):
        lines.append(f"| {route} | {balance} | {experts:,} | {k} | {len(rs)} | {_spread(rs, 'valid.loss')} | "
                     f"{_spread(rs, 'test.sentiment.mae')} | {_spread(rs, 'test.emotion.micro_f1')} | "
                     f"{_mean(rs, 'routing.summary.train_load_max_over_mean', 1)} | "
                     f"{_mean(rs, 'routing.summary.dead_experts', 0)} | "
                     f"{_mean(rs, 'routing.summary.sentiment_label_mi_excess', 2)} | "
                     f"{_mean(rs, 'routing.summary.stability', 2)} | "
                     f"{_mean(rs, 'train.samples_per_s', 0)} |")
    return "\n".join(lines)


def route_study_headline() -> str:
    """README's view of the routing-granularity study: balancing by aux_free at 1,024 experts and more."""
    groups: dict = {}
    for r in _records(*ROUTE_STUDY):
        if r["balance"] != "aux_free" or r["num_experts"] < 1024:
            continue
        groups.setdefault((r["num_experts"], r["route_per"]), []).append(r)

    def span(rs, key, digits):
        values = [r[key] for r in rs]
        low, high = min(values), max(values)
        return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}–{high:.{digits}f}"
    lines = ["| experts | route per | seeds | dead experts, epoch 1 → last (of 2 × N) | busiest ÷ mean, epoch 1 → last | "
             "uniform random routing: dead, busiest ÷ mean | dev loss | samples/s |", "|" + "---|" * 8]
    for (experts, route), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] == "step")):
        lines.append(f"| {experts:,} | {route} | {len(rs)} | {span(rs, 'dead_epoch1', 0)} → {span(rs, 'dead_last', 0)} | "
                     f"{span(rs, 'load_epoch1', 1)} → {span(rs, 'load_last', 1)} | "
                     f"{_mean(rs, 'uniform_dead', 0)}, {_mean(rs, 'uniform_load', 1)} | {_mean(rs, 'valid.loss', 3)} | "
                     f"{_mean(rs, 'train.samples_per_s', 0)} |")
    return "\n".join(lines)


def expert_scale_targets() -> str:
    """The expert-scale targets measured before the experts moved into banks and after, dense and lazy."""
    def load(name):
        path = os.path.join(ROOT, "bench", "results", f"{name}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return {r["experts"]: r for r in json.load(f)["rows"]}
    runs = {"before (DeepSpeed's ZeRO steps and saves every expert)": load("expert_scale_before"),
            "now, `--expert_optimizer dense` (default)": load("expert_scale"),
            "now, `--expert_optimizer lazy`": load("expert_scale_lazy")}
    runs = {k: v for k, v in runs.items() if v}

    def ratio(rows):
        return rows[16384]["samples_per_s"] / rows[1024]["samples_per_s"]

    def copy_ratio(row):   # checkpoint bytes over one copy of fp32 weights + AdamW's two moments
        return row["bytes"] / (12 * (row["params"]["dense"] + row["params"]["expert"]))
    lines = ["| | samples/s at 16,384 experts / at 1,024 (target ≥ 0.5) | most files one rank writes per "
             "checkpoint, any count (target ≤ 8) | checkpoint bytes / one copy of weights + optimizer state at "
             "16,384 (target ≤ 1.15) | save / load s at 16,384 | largest count measured |", "|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        most = max(max(int(v) for v in r["files_per_rank"].values()) for r in rows.values())
        big = rows[16384]
        lines.append(f"| {name} | {ratio(rows):.3f} | {most:,} | {copy_ratio(big):.2f} | {big['save_s']:.1f} / "
                     f"{big['load_s']:.1f} | {max(rows):,} |")
    return "\n".join(lines)


RENDERERS = {"expert_scale_targets": expert_scale_targets, "default_run": default_run,
             "moe_block_measures": moe_block_measures, "routing_study": routing_study,
             "route_study": route_study, "route_study_headline": route_study_headline}


def _table(text: str, n: int, source: str) -> str:
    """The n-th (1-based) run of consecutive lines that start with '|'."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if not 1 <= n <= len(tables):
        raise SystemExit(f"{source}: has {len(tables)} table(s), not a table {n}")
    return tables[n - 1]


def render(source: str) -> str:
    if source in RENDERERS:
        return RENDERERS[source]()
    path, _, query = source.partition("?")
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    kind, _, value = query.partition("=")
    if kind == "section":
        return _section(text, value.replace("+", " "), source)
    if kind == "table":
        return _table(text, int(value), source)
    if query:
        raise SystemExit(f"{source}: unknown selector {query!r} (section=HEADING or table=N)")
    return text.strip("\n")


def sync(check: bool) -> list[str]:
    """Rewrite (or, with check, only compare) every block; returns 'file: source' of the blocks that differ."""
    stale = []
    for doc in documents():
        with open(doc) as f:
            text = f.read()

        def replace(m):
            fresh = render(m.group("source")) + "\n"
            if m.group("body") != fresh:
                stale.append(f"{os.path.relpath(doc, ROOT)}: {m.group('source')}")
            return m.group(1) + fresh + m.group(4)
        new = BLOCK.sub(replace, text)
        if not check and new != text:
            with open(doc, "w") as f:
                f.write(new)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = sync(args.check)
    for s in stale:
        print(("stale: " if args.check else "rewrote: ") + s)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
