"""The package's imports point one way: each module imports only modules of its own layer or of layers below,
no two modules import each other (directly or through others), and an import inside a function says why it
is there (outside the command line, whose modules keep heavy imports out of `--help` by design)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mirage_trl"

# Lowest first: what describes data and models sits below the latent mechanism that drives them, and the
# trainers, pipelines and command line sit on top.
LAYERS = [
    (
        "core",
        [
            "errors",
            "console",
            "io",
            "redact",
            "stats",
            "checkpoints",
            "folders",
            "hub",
            "grading",
            "rewards",
            "shipped",
            "stages",
            "versions",
        ],
    ),
    ("data", ["data"]),
    ("models", ["models"]),
    ("latent", ["latent"]),
    ("inference", ["generation", "evaluation", "analysis"]),
    ("integrations", ["integrations"]),
    ("outputs", ["configs", "card", "export", "report", "curves", "preflight"]),
    ("trainers", ["trainers"]),
    ("pipelines", ["run", "experiment"]),
    ("cli", ["cli", "__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:  # the top package only maps public names to modules, lazily
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, (_, tops) in enumerate(LAYERS):
        if head in tops:
            return i
    raise AssertionError(f"mirage_trl.{module} is in no layer: add it to LAYERS")


def _imports(module: str, path: Path):
    """(target module, line, inside a function, has a comment) for each package-internal import."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("mirage_trl."):
                target = node.module.removeprefix("mirage_trl.")
            else:
                continue
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("mirage_trl.") for a in node.names if a.name.startswith("mirage_trl.")
            ]
        else:
            continue
        known = _modules()
        for name in names:
            while name and name not in known:  # `from .x import y`: y is a name in module x
                name = name.rpartition(".")[0]
            if name:
                comment = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                yield name, node.lineno, id(node) in in_function, comment


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"mirage_trl/{path.relative_to(PACKAGE)}:{line}: {module} ({LAYERS[_layer(module)][0]}) imports "
        f"{target} ({LAYERS[_layer(target)][0]})"
        for module, path in _modules().items()
        for target, line, _, _ in _imports(module, path)
        if _layer(target) > _layer(module)
    ]
    assert not wrong, "imports that point upward:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, *_ in _imports(m, p) if t != m} for m, p in _modules().items()}
    # a package's __init__ re-exporting its own modules is not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_say_why():
    bare = [
        f"mirage_trl/{path.relative_to(PACKAGE)}:{line}: imports {target} inside a function without a comment"
        for module, path in _modules().items()
        if not module.startswith("cli")
        for target, line, inner, comment in _imports(module, path)
        if inner and not comment
    ]
    assert not bare, "\n".join(bare)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The check itself: a model module importing the latent mechanism is reported."""
    path = tmp_path / "load.py"
    path.write_text("from ..latent.stage2 import x\n\n\ndef f():\n    from ..data import vsp\n")
    found = list(_imports("models.load", path))
    assert [(t, inner, c) for t, _, inner, c in found] == [
        ("latent.stage2", False, False),
        ("data.vsp", True, False),
    ]
    assert _layer("latent.stage2") > _layer("models.load")
