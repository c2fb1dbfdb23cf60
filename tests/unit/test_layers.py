"""The package's dependencies read top-down: every module imports only from its own layer or the layers below,
and no import chain comes back to where it started. A module of the lower layers never imports the training
loop; the model never imports the data layer, nor the data layer the model."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mmolre"

# lowest first; a package (data, model) is one entry for all its modules
LAYERS = [
    {"version", "config", "tensorboard_tags", "metrics", "losses", "lr_schedule", "monitor", "preemption", "routing_stats",
     "distributed", "host_memory"},
    {"data", "model"},
    {"engine", "evaluate", "checkpoint", "topology_free_state", "train_state", "expert_optimizer",
     "expert_state_files", "memory_estimate"},
    {"checkpointer", "expert_loads", "emotion_decisions", "results", "step_metrics", "step_guards", "build"},
    {"train"},
    {"export", "shared_model", "report", "cli", "launcher", "__init__"},   # __init__: the public API
]
SEPARATE = [("model", "data"), ("data", "model")]   # (importer, imported) pairs that must never occur


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_only(node, parents) -> bool:
    """Inside the body (not the else) of an `if TYPE_CHECKING:`."""
    chain = parents + [node]
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) and chain[i + 1] in p.body
               for i, p in enumerate(parents))


def imports_of(path: pathlib.Path) -> set[str]:
    """Modules of this package that `path` imports (at any depth, type-checking-only imports aside)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    parents = {}
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            parents[child] = parents.get(parent, []) + [parent]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents.get(node, [])):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "mmolre":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:   # `from . import checkpoint` names a module; `from .x import y` does not
                sub = ".".join(target + [alias.name])
                found.add(sub if (PACKAGE / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE / sub.replace(".", "/")).is_dir() else ".".join(target))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] if "." in a.name else "__init__" for a in node.names
                      if a.name == "mmolre" or a.name.startswith("mmolre.")}
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__"):
            raise AssertionError(f"{path}: a dynamic import ({ast.unparse(node)}) this check cannot follow")
    found.discard("")
    return found - {name}


def layer(module: str) -> int:
    top = module.split(".")[0] or "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"mmolre/{module}: not in any layer of {__file__}; add it where it belongs")


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_imports_only_from_its_layer_or_below():
    for module in graph():
        layer(module)   # every module has a layer, imported or not
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward
    crossing = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
                if (m.split(".")[0], d.split(".")[0]) in SEPARATE]
    assert not crossing, crossing


def test_no_import_cycle():
    g = graph()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_checker_sees_imports():
    g = graph()
    assert {"checkpointer", "step_metrics", "emotion_decisions", "results"} <= g["train"]
    assert "config" in g["data.schema"] and "data.schema" in g["data.cache"]


def test_the_size_limits_of_the_house():
    """The loop fits on a few screens and nothing grows back into one class: train.py <= 300 lines, classes
    <= 250, functions <= 60 (the limits README's "Layout" states)."""
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > 250 or \
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                over.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({size} lines)")
    lines = len((PACKAGE / "train.py").read_text().splitlines())
    assert lines <= 300, f"mmolre/train.py has {lines} lines"
    assert not over, over
