"""The layout's rules, checked on the source: no import cycles, each layer imports only the layers
below it, nothing outside the AnnData models reaches into their torch module, and public functions
follow the scanpy conventions (AnnData first, at most three positional arguments, options
keyword-only, no positional booleans)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "genailab"

# What each part of the package may import at module level (besides itself). ARCHITECTURE.md draws it.
BASE = {"genailab", "errors", "checks", "safe_write"}  # the root package only holds __version__ and lazy names
ALLOWED = {
    "errors": set(),
    "checks": {"errors"},
    "safe_write": {"errors"},
    "likelihood": BASE,
    "eval": BASE,
    "model": BASE | {"likelihood"},
    "data": BASE | {"likelihood"},
    "train": BASE | {"likelihood", "model", "data"},
    "anndata_models": BASE | {"likelihood", "model", "data", "train"},
    "apps": BASE | {"model", "data", "train", "anndata_models", "eval"},
    "perturb": BASE | {"model", "data", "train", "anndata_models", "eval"},
    "report": BASE | {"model", "data", "train", "anndata_models", "eval", "apps"},
    "cli": BASE | {"model", "data", "train", "anndata_models", "eval", "apps", "perturb", "report"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """genailab modules imported at module level (not inside functions) by the file at ``path``."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # e.g. TYPE_CHECKING blocks are not run
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("genailab"):
                found.add(sub.module)
                for alias in sub.names:  # ``from genailab import eval`` imports a subpackage
                    candidate = f"{sub.module}.{alias.name}"
                    if _exists(candidate):
                        found.add(candidate)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("genailab"))
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (SRC / relative).with_suffix(".py").is_file() or (SRC / relative / "__init__.py").is_file()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _top_level_imports(p) for p in SRC.rglob("*.py")}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detection_fails_on_a_cycle(graph):
    """The check above can fail: a planted back edge is found."""
    planted = {k: set(v) for k, v in graph.items()}
    planted["genailab.errors"].add("genailab.model.vae")
    seen, path = set(), []

    def has_cycle(module: str) -> bool:
        if module in path:
            return True
        if module in seen:
            return False
        seen.add(module)
        path.append(module)
        found = any(has_cycle(t) for t in planted.get(module, ()))
        path.pop()
        return found

    assert any(has_cycle(m) for m in sorted(planted))


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "genailab"


def test_each_layer_imports_only_the_layers_below(graph):
    violations = []
    for module, targets in sorted(graph.items()):
        part = _part(module)
        if part in ("genailab", "__main__"):
            continue
        for target in targets:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if not p.name.startswith("__")}
    parts = {p for p in parts if p not in ("py",) and not p.endswith(".typed")}
    assert parts <= set(ALLOWED) | {"py"}, sorted(parts - set(ALLOWED))


def test_only_the_anndata_models_touch_their_torch_module():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name in ("anndata_models", "model", "train"):  # the owners and the tensor layers
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "module":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders


PUBLIC_FUNCTION_MODULES = ["genailab.apps", "genailab.eval", "genailab.report", "genailab.perturb", "genailab.data"]


def _public_callables():
    for name in PUBLIC_FUNCTION_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isfunction(obj):
                yield f"{name}.{attr}", obj
    from genailab import VAE, PerturbationModel

    for cls in (VAE, PerturbationModel):
        for attr, obj in inspect.getmembers(cls, inspect.isfunction):
            if not attr.startswith("_") or attr == "__init__":
                yield f"{cls.__name__}.{attr}", obj


@pytest.mark.parametrize("name,function", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_signature_conventions(name, function):
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name}: {len(positional)} positional arguments"
    booleans = [p.name for p in positional if isinstance(p.default, bool)]
    assert not booleans, f"{name}: positional booleans {booleans}; make them keyword-only"
    names = [p.name for p in positional]
    if "adata" in names and "model" in names:
        assert names.index("adata") < names.index("model"), f"{name}: AnnData first, then the model"
    if "adata" in names:
        assert names.index("adata") == 0, f"{name}: the AnnData comes first"
