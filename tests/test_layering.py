"""Kiln's layering, checked by walking every import of the source tree (no module is imported).

Layers, lowest first: ir <- frontends, passes <- kernels, codegen <- runtime <- the API package
(python/kiln: driver, options, API, CLI). A module may import its own layer and the layers
below; the base modules (errors, progress, options, target, the native extension, the
version) are importable everywhere and import only each other. Names with a leading
underscore are private to their module: no other Kiln module imports them.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ir": 0, "frontends": 1, "passes": 1, "kernels": 2, "codegen": 2, "runtime": 3}
API = 4
BASE = {"kiln.errors", "kiln.progress", "kiln.options", "kiln.target", "kiln._C", "kiln.__version__"}


def _sources():
    """(module name, path) of every Kiln source file."""
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield "kiln." + ".".join(parts), path
    for path in sorted((ROOT / "python" / "kiln").glob("*.py")):
        name = "kiln" if path.stem == "__init__" else f"kiln.{path.stem}"
        yield name, path


def _rank(module: str) -> int | None:
    """The layer of ``module``; -1 for a base module; None outside Kiln."""
    parts = module.split(".")
    if parts[0] != "kiln":
        return None
    if len(parts) == 1:
        return API
    if ".".join(parts[:2]) in BASE:
        return -1
    return PACKAGES.get(parts[1], API)


def _imports(name: str, path: Path):
    """(line, imported module, imported names) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            if base == "kiln":  # `from kiln import x`: x is a module (or a base name)
                for n in names:
                    yield node.lineno, f"kiln.{n}", ()
            else:
                yield node.lineno, base, names


def test_no_import_points_up_the_layers():
    bad = []
    for name, path in _sources():
        own = _rank(name)
        for line, module, _ in _imports(name, path):
            r = _rank(module)
            if r is None:
                continue
            if own == -1 and r != -1:
                bad.append(f"{path.relative_to(ROOT)}:{line}: base module {name} imports {module}")
            elif r > own:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} imports {module} (a higher layer)")
    assert not bad, "imports that point up the layering:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in _sources():
        for line, module, names in _imports(name, path):
            if _rank(module) is None or module == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__") and
                       n not in ("_C", "_cpu_pool")]  # the compiled modules
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} imports {', '.join(private)} from {module}")
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)


def test_the_walk_sees_the_whole_tree():
    # a guard against the check passing because it found nothing to check
    names = {n for n, _ in _sources()}
    assert {"kiln.ir.graph", "kiln.passes.pipeline", "kiln.runtime.plan", "kiln.driver", "kiln.options"} <= names
    assert sum(1 for _ in _imports("kiln.driver", ROOT / "python" / "kiln" / "driver.py")) > 5


def test_only_the_options_module_touches_the_environment():
    offenders = []
    for name, path in _sources():
        if name == "kiln.options":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "os.environ / os.getenv outside kiln/options.py:\n" + "\n".join(offenders)


def test_a_planted_upward_import_is_caught(tmp_path):
    # the rank rule on a synthetic file: an ir module importing the runtime is reported
    fake = tmp_path / "ir_mod.py"
    fake.write_text("from kiln.runtime import plan\nfrom kiln.options import settings\n")
    found = [(m, _rank(m)) for _, m, _ in _imports("kiln.ir.ir_mod", fake)]
    assert found == [("kiln.runtime", 3), ("kiln.options", -1)]
    assert _rank("kiln.ir.graph") == 0 and _rank("kiln.driver") == API and _rank("torch") is None
    assert os.path.isdir(ROOT / "ir")
