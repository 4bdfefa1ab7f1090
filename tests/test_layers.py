"""The layers of ARCHITECTURE.md, enforced: each package of mtc75 imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mtc75"
# layer -> what its modules may import from mtc75 (besides themselves); see ARCHITECTURE.md
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "errors": set(),
    "settings": {"core", "errors"},
    "runtime": {"core", "errors"},
    "kafka": {"core", "errors"},
    "engine": {"core", "errors", "settings", "runtime", "kafka"},
    "observe": {"core", "errors"},
    "api": {"core", "errors", "settings", "runtime", "kafka", "engine", "observe"},
    "testing": {"core", "errors", "settings", "runtime", "kafka", "api"},
    "app": {"core", "errors", "settings", "runtime", "api"},
    "tools": {"core", "errors", "settings", "kafka", "app"},
    "commands": {"core", "errors", "settings", "runtime", "kafka", "observe", "api", "app", "tools"},
}


def _layer(module: str) -> str:
    """``mtc75.engine.engine`` -> ``engine``; ``mtc75.api`` -> ``api``."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtc75."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("mtc75."))
    return out


def _modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" and not p.name.startswith("_")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_the_layers_below_its_own(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in ALLOWED, f"{own}: a new layer? add it to ALLOWED and ARCHITECTURE.md"
    wrong = sorted(m for m in _imports(path) if _layer(m) not in ALLOWED[own] | {own} and m != "mtc75._startup")
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own}) imports {wrong}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from mtc75.engine.engine import Engine\n")
    assert {_layer(m) for m in _imports(bad)} - ALLOWED["app"] == {"engine"}


# The engine and the dispatcher stay readable in one sitting: their parts own the concerns (ARCHITECTURE.md).
# (module, class, most lines of the module, most methods of the class, most internal modules it imports)
SMALL = [
    ("engine/engine.py", "Engine", 350, 15, 14),
    ("runtime/dispatcher.py", "Dispatcher", 490, 38, 15),
]
# Every other runtime module and class: a new concern gets a module of its own, not a longer one.
RUNTIME_MAX_LINES, RUNTIME_MAX_METHODS = 500, 20


@pytest.mark.parametrize(("module", "name", "max_lines", "max_methods", "max_imports"), SMALL,
                         ids=[row[0] for row in SMALL])
def test_the_engine_and_the_dispatcher_stay_small_and_import_a_bounded_number_of_modules(
    module: str, name: str, max_lines: int, max_methods: int, max_imports: int
) -> None:
    path = PACKAGE / module
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert len(path.read_text().splitlines()) <= max_lines
    assert len(methods) <= max_methods, [m.name for m in methods]
    assert len(_imports(path)) <= max_imports, sorted(_imports(path))


@pytest.mark.parametrize("path", sorted((PACKAGE / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_every_runtime_module_and_class_stays_small(path: Path) -> None:
    capped = {(PACKAGE / row[0], row[1]): row[3] for row in SMALL}
    assert len(path.read_text().splitlines()) <= RUNTIME_MAX_LINES
    for cls in (n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)):
        methods = [n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        assert len(methods) <= capped.get((path, cls.name), RUNTIME_MAX_METHODS), (cls.name, methods)
