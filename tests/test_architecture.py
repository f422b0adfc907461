"""The layout's import rule, enforced: imports point downward only.

Layers, top to bottom (docs/ARCHITECTURE.md):
  4 cli                 fasttrain.cli, fasttrain.__main__
  3 trainer             fasttrain.trainer
  2 concerns            checkpoint, optim, precision, profiler, compile, data, ops, models
  1 foundations         distributed, kernels, training_args (+ _help, _choices, _checks, _fields),
                        callbacks, extras
A module may import its own layer or a lower one; every `import` statement counts, including
the lazy ones inside functions. Between subpackages of one layer there must be no cycle.
`kernels/` imports only torch, triton, the standard library and itself.
"""
from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

LAYERS = {
    "cli": 4, "__main__": 4,
    "trainer": 3,
    "checkpoint": 2, "optim": 2, "precision": 2, "profiler": 2, "compile": 2, "data": 2,
    "ops": 2, "models": 2,
    "distributed": 1, "kernels": 1, "training_args": 1, "training_args_help": 1,
    "training_args_choices": 1, "training_args_checks": 1, "training_args_fields": 1, "callbacks": 1,
    "extras": 1,
}


def _unit(module: str) -> str | None:
    """fasttrain.optim.adamw -> 'optim'; the package root itself -> None."""
    parts = module.split(".")
    if parts[0] != "fasttrain" or len(parts) < 2:
        return None
    return parts[1]


def _source_units():
    for path in sorted((ROOT / "fasttrain").rglob("*.py")):
        rel = path.relative_to(ROOT / "fasttrain").with_suffix("")
        if rel.parts == ("__init__",):
            continue  # the public re-exports of the package root sit above everything
        yield path, rel.parts[0]
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield path, "kernels"


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fasttrain":  # `from fasttrain import x`: x is the unit
                for alias in node.names:
                    yield node.lineno, f"fasttrain.{alias.name}"
            else:
                yield node.lineno, node.module


def _edges():
    for path, unit in _source_units():
        for line, module in _imports(path):
            target = _unit(module)
            if target is not None and target != unit:
                yield path.relative_to(ROOT), line, unit, target, module


def test_every_unit_has_a_layer():
    units = {unit for _, unit in _source_units()}
    assert units <= set(LAYERS), f"give these a layer in LAYERS and docs/ARCHITECTURE.md: {units - set(LAYERS)}"


def test_imports_point_downward_only():
    upward = [f"{path}:{line}: {unit} (layer {LAYERS[unit]}) imports {module} (layer {LAYERS.get(target)})"
              for path, line, unit, target, module in _edges()
              if LAYERS.get(target, 0) > LAYERS[unit]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for _, _, unit, target, _ in _edges():
        graph.setdefault(unit, set()).add(target)

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(u for u in graph if reaches(u, u, {u}))
    assert not cycles, f"import cycles through: {cycles} (graph: {graph})"


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    bad = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not bad, "kernels/ must import only torch and triton:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    # the rule can fail: an import of the Trainer from a concern is reported
    src = tmp_path / "bad.py"
    src.write_text("def f():\n    from fasttrain.trainer import Trainer\n")
    found = [(line, m) for line, m in _imports(src)]
    assert found == [(2, "fasttrain.trainer")]
    assert LAYERS[_unit(found[0][1])] > LAYERS["optim"]
