"""Every `file:LINE` a document of the project cites points at what the text says is there.

A line number in prose goes stale as soon as the file above it changes; where the docs cite one
(a gdb session, a sanitizer's message), this test holds it to the file: the line exists and is
not blank; a gdb echo of it (`LINE<tab>source` on the next line) is that line's text; a kernel
the same sentence names (`kernel 'NAME'`) holds the line."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(?:<repo>/)?(?P<path>[\w./-]+\.(?:cuh|cu|py|h|cpp|sh)):(?P<line>\d+)\b(?!:\d)")
KERNEL = re.compile(r"kernel '(\w+)'")
DEFINITION = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")


def _docs():
    return sorted(p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
                  and "node_modules" not in p.parts)


def _file(name):
    for candidate in (ROOT / name, ROOT / "kernels" / name):
        if candidate.is_file():
            return candidate
    return None      # a name in an example (my_conv.cu:1 is a version of a learner's copy)


def _references():
    for doc in _docs():
        lines = doc.read_text().splitlines()
        for i, text in enumerate(lines):
            for m in REFERENCE.finditer(text):
                target = _file(m.group("path"))
                if target is not None:
                    following = lines[i + 1] if i + 1 < len(lines) else ""
                    yield pytest.param(doc, i + 1, text, target, int(m.group("line")), following,
                                       id=f"{doc.relative_to(ROOT)}:{i + 1}:{m.group('path')}:{m.group('line')}")


@pytest.mark.parametrize("doc,at,text,target,number,following", list(_references()))
def test_a_cited_line_is_the_line_meant(doc, at, text, target, number, following):
    source = target.read_text().splitlines()
    where = f"{doc.relative_to(ROOT)}:{at} cites {target.relative_to(ROOT)}:{number}"
    assert 1 <= number <= len(source) and source[number - 1].strip(), f"{where}: no such line (or a blank one)"
    echo = re.match(rf"{number}\t(.*)$", following)
    if echo:                                   # gdb prints the line it stopped at
        assert source[number - 1].rstrip() == echo.group(1).rstrip(), f"{where}: the line is now {source[number - 1]!r}"
    named = KERNEL.search(text)
    if named:
        defined = [DEFINITION.search(line) for line in source[:number]]
        last = [d.group(1) for d in defined if d]
        assert last and last[-1] == named.group(1), f"{where}: the line is in {last[-1] if last else 'no kernel'}, " \
                                                    f"not in kernel '{named.group(1)}'"


def test_the_check_is_not_blind():
    refs = [p.values for p in _references()]
    assert any(re.match(rf"{number}\t", following) for *_, number, following in refs)      # a gdb echo
    assert any(KERNEL.search(text) for _, _, text, *_ in refs)                              # a named kernel
