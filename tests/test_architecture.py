"""The layering of ARCHITECTURE.md, checked from the sources: imports point down only
(train.py -> data/, nn/ -> kernels/; data/ independent of nn/ and kernels/; nothing imports bench/
or tests/), and no two modules of one package import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "nn", "data", "bench")


def imports_of(path):
    """Top-level package names and full module names a file imports (absolute and relative)."""
    pkg = path.parent.name
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: inside the file's own package
                base = pkg if node.level == 1 else ""
                out.add(f"{base}.{node.module}" if node.module else base)
                out.update(f"{base}.{a.name}" for a in node.names if node.module is None)
            elif node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules(package):
    return {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py")}


def test_imports_point_down():
    allowed = {"kernels": set(), "nn": {"kernels"}, "data": set(), "bench": {"kernels", "nn", "data", "train"}}
    for package, ok in allowed.items():
        for name, path in modules(package).items():
            used = {m.split(".")[0] for m in imports_of(path)} & (set(PACKAGES) | {"train", "tests"})
            bad = used - ok - {package}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    used = {m.split(".")[0] for m in imports_of(ROOT / "train.py")}
    assert not used & {"bench", "tests", "kernels"}, "train.py uses data/ and nn/ only"


def test_no_module_imports_one_that_imports_it():
    for package in ("kernels", "nn", "data"):
        mods = modules(package)
        graph = {name: {m for m in imports_of(path) if m in mods and m != name} for name, path in mods.items()}
        for a, deps in graph.items():
            for b in deps:
                assert a not in graph[b], f"import cycle: {a} <-> {b}"
