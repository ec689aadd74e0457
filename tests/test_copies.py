"""Every block marked `# Copied from FILE.NAME` is a character-for-character copy of FILE.NAME.

The model files are self-contained on purpose (a reader copies one file, or one block, into their own code), so
shared blocks are duplicated rather than imported. This test keeps the duplicates from drifting apart.
"""
import ast
import importlib
import re

import pytest

from conftest import ROOT

MODEL_FILES = ["ae_kl", "ae_vq", "dcae", "infd", "unet_ldm", "dit", "hdit"]
MARK = re.compile(r"^# Copied from (\w+)\.(\w+)\s*$")


def top_level_sources(path):
    """{name: exact source text} of every top-level def / class of a file."""
    text = path.read_text()
    return {node.name: ast.get_source_segment(text, node, padded=False) for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}, text.splitlines()


def marked_copies():
    out = []
    for name in MODEL_FILES:
        _, lines = top_level_sources(ROOT / f"{name}.py")
        for i, line in enumerate(lines):
            m = MARK.match(line)
            if m:
                out.append((name, i, m.group(1), m.group(2)))
    return out


COPIES = marked_copies()


def test_there_are_copies_to_check():
    files = {c[0] for c in COPIES}
    assert {"ae_vq", "dcae", "infd"} <= files and len(COPIES) >= 30, COPIES


@pytest.mark.parametrize("file,line,src_file,name", COPIES, ids=[f"{c[0]}.{c[3]}" for c in COPIES])
def test_copy_is_exact(file, line, src_file, name):
    mine, lines = top_level_sources(ROOT / f"{file}.py")
    theirs, _ = top_level_sources(ROOT / f"{src_file}.py")
    assert name in theirs, f"{file}.py:{line + 1} copies {src_file}.{name}, which does not exist"
    # the marker sits right above the copied block (decorators included)
    following = next(ln for ln in lines[line + 1:] if ln.strip())
    assert re.match(rf"^(@|def {name}\b|class {name}\b)", following), f"{file}.py:{line + 1}: marker not above {name}"
    assert name in mine, f"{file}.py has no top-level {name}"
    assert mine[name] == theirs[name], f"{file}.{name} differs from {src_file}.{name}"
    assert importlib.import_module(file).__dict__[name] is not importlib.import_module(src_file).__dict__[name]
