"""The layering of ARCHITECTURE.md, checked from the sources.

- Imports point down only: train.py -> data/, nn/ -> kernels/; data/ independent of nn/ and
  kernels/; nothing imports bench/ or tests/.
- kernels/ is three rooms: the ops at its top (each `<op>.py` launcher beside its `<op>.cu`, and
  the op contract, references, versions and lesson runner), the run-time machinery in
  kernels/runtime/, the CPU emulator in kernels/emu/; imports point ops -> runtime -> emu.
- No import circle anywhere: no module imports, through any chain, one that imports it.
  (A package's `__init__.py` is its face: importing `a.b.c` runs `a/__init__.py` first, but that is
  Python's order of initialisation, not a dependency of `c`, so those edges are not counted.)
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "nn", "data", "bench")

# Top-level files of kernels/ that are not the launcher of a .cu file: the op contract and the lesson.
KERNELS_TOP = {"__init__", "__main__", "ops", "reference", "contract", "versions", "cases", "lesson", "cudnn_engine"}


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path):
    """Full names of the modules (and of names inside them) that a file imports."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def all_modules():
    mods = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    mods["train"] = ROOT / "train.py"
    return mods


def graph():
    """module -> the modules of the project it imports (faces excluded, see the docstring)."""
    mods = all_modules()
    faces = {name for name, p in mods.items() if p.name == "__init__.py"}
    return {name: {m for m in imports_of(path) if m in mods and m != name and m not in faces}
            for name, path in mods.items() if name not in faces}


def test_imports_point_down():
    allowed = {"kernels": set(), "nn": {"kernels"}, "data": set(), "bench": {"kernels", "nn", "data", "train"}}
    for name, path in all_modules().items():
        top = name.split(".")[0]
        if top == "train":
            continue
        used = {m.split(".")[0] for m in imports_of(path)} & (set(PACKAGES) | {"train", "tests"})
        bad = used - allowed[top] - {top}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    used = {m.split(".")[0] for m in imports_of(ROOT / "train.py")}
    assert not used & {"bench", "tests", "kernels"}, "train.py uses data/ and nn/ only"


def test_kernels_is_three_rooms_ops_runtime_emu():
    rank = {"kernels.emu": 0, "kernels.runtime": 1}
    for name, path in all_modules().items():
        if not name.startswith("kernels"):
            continue
        room = ".".join(name.split(".")[:2]) if name.count(".") >= 2 or path.name == "__init__.py" else "kernels"
        mine = rank.get(room, 2)
        for m in imports_of(path):
            if m.startswith("kernels."):
                theirs = rank.get(".".join(m.split(".")[:2]), 2)
                assert theirs <= mine, f"{path.relative_to(ROOT)} imports {m}: kernels/ imports point ops -> runtime -> emu"
    top = {p.stem for p in (ROOT / "kernels").glob("*.py")}
    machinery = {s for s in top - KERNELS_TOP if not (ROOT / "kernels" / f"{s}.cu").exists()}
    assert not machinery, f"kernels/ top level holds the ops only; move {sorted(machinery)} into runtime/ or emu/"
    assert {p.name for p in (ROOT / "kernels").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {"runtime", "emu"}


def circles(g):
    """The import circles of graph `g` (module -> modules it imports): Tarjan's strongly connected
    components of more than one module, each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_circle_check_finds_circles():
    """The check on known circles, so that it cannot pass vacuously: a two-module loop, and the
    twelve-file circle kernels/ had when each launcher imported the lesson runner."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = graph()
    assert circles(g) == [] and "kernels.conv" in g["kernels.cases"]
    g["kernels.conv"] = g["kernels.conv"] | {"kernels.lesson"}
    assert ["kernels.cases", "kernels.conv", "kernels.lesson"] in circles(g)
