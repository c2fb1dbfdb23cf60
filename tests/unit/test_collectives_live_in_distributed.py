"""Every collective of the trainer goes through mmolre/distributed.py (the static check; the runtime checks are
tests/system/test_collectives.py)."""
import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mmolre"


# The MoE layer's own exchanges run on the model's device, inside the model.
ALLOWED = {PACKAGE / "distributed.py", PACKAGE / "model" / "grouped.py", PACKAGE / "model" / "sparse_gating.py"}


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "gather", "gather_object", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "all_to_all", "all_to_all_single",
               "all_gather_into_tensor", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
               "recv", "isend", "irecv", "monitored_barrier", "all_reduce_coalesced", "all_gather_coalesced",
               "batch_isend_irecv", "all_gather_single"}


def _distributed_aliases(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to torch.distributed / deepspeed.comm modules, and collectives imported by name."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch.distributed", "deepspeed.comm"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (node.module, alias.name) in (("torch", "distributed"), ("deepspeed", "comm")):
                    modules.add(alias.asname or alias.name)
                elif node.module in ("torch.distributed", "deepspeed.comm") and alias.name in COLLECTIVES:
                    functions.add(alias.asname or alias.name)
    return modules, functions


def test_no_collective_is_called_outside_distributed_py():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        modules, functions = _distributed_aliases(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            dotted = ast.unparse(f)
            via_module = isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and (
                ast.unparse(f.value) in modules | {"torch.distributed", "deepspeed.comm"})
            if via_module or (isinstance(f, ast.Name) and f.id in functions):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {dotted}")
    assert not offenders, "collectives outside mmolre/distributed.py: " + ", ".join(offenders)
