"""Imports point only downward through the layers, and solver method files never import each other."""

import ast
from pathlib import Path

import dpmlab

SRC = Path(dpmlab.__file__).parent

# lower number = lower layer; a module may import only from layers <= its own (and not sideways
# between solver method files)
LAYERS = {
    "_utils": 0,
    "typing": 0,
    "_version": 0,
    "schedules": 1,
    "timesteps": 2,
    "models": 2,
    "solvers": 3,
    "api": 4,
    "parallel": 4,
    "bench": 4,
    "calibrate": 4,
    "training": 4,
    "methods": 4,
    "editing": 4,
    "analysis": 4,
    "apps": 4,
    "interop": 4,
    "metrics": 4,
    "cli": 5,
    "__init__": 6,
    "__main__": 6,
}
SOLVER_SHARED = {"base", "_expint", "_multistep", "_ems", "__init__"}  # shared math, the multistep engine


def _module_of(path: Path) -> tuple[str, ...]:
    return path.relative_to(SRC).with_suffix("").parts


def _imports(mod: tuple[str, ...], source: str) -> list[tuple[str, ...]]:
    """Absolute dpmlab module paths imported by module ``mod`` with text ``source``."""
    pkg = mod[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + tuple((node.module or "").split(".")) if node.module else base
                names = [target + (a.name,) for a in node.names] if not node.module else [target]
                out.extend(names)
            elif node.module and node.module.startswith("dpmlab"):
                out.append(tuple(node.module.split("."))[1:])
        elif isinstance(node, ast.Import):
            out.extend(tuple(a.name.split("."))[1:] for a in node.names if a.name.startswith("dpmlab"))
    return [t for t in out if t]


def _layer(parts: tuple[str, ...]) -> int:
    if parts[0] not in LAYERS:
        raise AssertionError(f"module {'.'.join(parts)} has no layer in test_imports.LAYERS; add it")
    return LAYERS[parts[0]]


def _violations(modules: dict[tuple[str, ...], str]) -> list[str]:
    problems = []
    for mod, source in modules.items():
        if mod == ("__init__",):
            continue
        for target in _imports(mod, source):
            if _layer(target) > _layer(mod):
                problems.append(f"{'.'.join(mod)} imports higher layer {'.'.join(target)}")
            if mod[0] == "solvers" and target[0] == "solvers" and len(target) > 1 and len(mod) > 1:
                if mod[1] not in SOLVER_SHARED and target[1] not in SOLVER_SHARED and target[1] != mod[1]:
                    problems.append(f"solver file {'.'.join(mod)} imports another method file {'.'.join(target)}")
    return problems


def test_no_upward_or_sideways_imports():
    problems = _violations({_module_of(p): p.read_text() for p in SRC.rglob("*.py")})
    assert not problems, "\n".join(problems)


def test_the_checker_catches_upward_and_sideways_imports():
    fake = {
        ("schedules",): "from .solvers.base import Solver\n",
        ("solvers", "ddim"): "from .karras import Heun\nfrom .base import Solver\n",
        ("models", "analytic"): "from dpmlab.cli import main\n",
    }
    problems = _violations(fake)
    assert any("schedules imports higher layer solvers.base" in p for p in problems)
    assert any("solvers.ddim imports another method file solvers.karras" in p for p in problems)
    assert any("models.analytic imports higher layer cli" in p for p in problems)
    assert len(problems) == 3
