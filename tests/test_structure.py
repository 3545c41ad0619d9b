"""The shape of the code, read from its imports: data flows one way (no import cycle, nothing
below the commands imports them), no module imports another's `_private` names, the inference
path imports no training, TensorFlow or torch module, and a sam_jax module is imported inside a
function only when it needs an optional extra (the commands import the training code lazily, so
that a missing extra is one line, not a traceback at start-up)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sam_jax"
# Modules that need an extra beyond the inference install (optax, ml_collections, ...): the only
# sam_jax modules another module may import inside a function.
OPTIONAL = ("sam_jax.training",)
# Lower layers never import these (the commands and the automatic mask generator sit on top).
# (the entry points, `__main__` modules, are the top; the automatic mask generator is used by the
# data engine, the evaluation, the exported decoder's stability score and the TPU plans of the
# generator's device work).
UPPER = {
    "sam_jax.cli": (),
    "sam_jax.amg": (
        "sam_jax.annotate",
        "sam_jax.evaluation",
        "sam_jax.export",
        "sam_jax.training",
        "sam_jax.cli",
    ),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _targets(node: ast.AST) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) of an import statement, sam_jax modules only."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.startswith("sam_jax")]
    if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("sam_jax"):
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
    names = [a.name for a in node.names if f"{node.module}.{a.name}" not in MODULES]
    return [(s, []) for s in subs] + ([(node.module, names)] if names else [])


def _imports():
    """{module: [(target, names, at_module_level)]}."""
    found = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        rows = []
        for top in tree.body:
            level = not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            for node in ast.walk(top):
                rows += [(t, n, level) for t, n in _targets(node)]
        found[name] = rows
    return found


IMPORTS = _imports()


def test_no_import_cycle():
    graph = {m: {t for t, _, top in rows if top and t in MODULES} for m, rows in IMPORTS.items()}
    state, path, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    assert cycles == []


def test_lower_layers_do_not_import_the_commands_or_the_generator():
    wrong = []
    for m, rows in IMPORTS.items():
        for upper, allowed in UPPER.items():
            if m.startswith(upper) or m.startswith(allowed) or m.endswith(".__main__"):
                continue
            wrong += [(m, t) for t, _, _ in rows if t.startswith(upper)]
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    wrong = [(m, t, n) for m, rows in IMPORTS.items() for t, ns, _ in rows for n in ns]
    wrong = [(m, t, n) for m, t, n in wrong if n.startswith("_") and not n.startswith("__")]
    tests = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            tests += [(path.name, t, n) for t, ns in _targets(node) for n in ns if n[0] == "_"]
    assert wrong == [] and tests == []


def test_function_level_imports_are_for_optional_extras_only():
    wrong = [
        (m, t)
        for m, rows in IMPORTS.items()
        for t, _, top in rows
        if not top and not t.startswith(OPTIONAL)
    ]
    assert wrong == []


def test_the_inference_path_imports_no_training_tensorflow_or_torch():
    code = (
        "import sys, sam_jax, sam_jax.predictor, sam_jax.amg, sam_jax.functional;"
        "sam_jax.load; sam_jax.SamPredictor;"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'tensorflow', 'tensorflow_datasets', 'optax', 'orbax', 'transformers', "
        "'ml_collections') or m.startswith('sam_jax.training'));"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
