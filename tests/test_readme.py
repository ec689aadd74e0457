"""The README's promises that a test can keep: the instructors' table names blocks that exist and grading
commands that select tests, and no file points readers at paths a clone does not have."""
import ast
import importlib
import re

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
MODEL_FILES = ["ae_kl", "ae_vq", "dcae", "infd", "unet_ldm", "dit", "hdit"]


def teaching_rows():
    """(model file, block names, test file, -k expression) of every row of the "Teaching with it" table."""
    section = README.split("## Teaching with it", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)\.py` \| (.*) \| `python -m pytest (tests/\w+\.py) -k (\S+|\"[^\"]+\")` \|$", line)
        if m:
            rows.append((m.group(1), re.findall(r"`([\w.]+)`", m.group(2)), m.group(3), m.group(4).strip('"')))
    return rows


ROWS = teaching_rows()


def test_every_file_has_teaching_rows():
    assert {r[0] for r in ROWS} == set(MODEL_FILES), sorted({r[0] for r in ROWS})


@pytest.mark.parametrize("model,blocks,test_file,expr", ROWS, ids=[f"{r[0]}-{r[3]}" for r in ROWS])
def test_teaching_row_names_real_blocks_and_tests(model, blocks, test_file, expr):
    module = importlib.import_module(model)
    for name in blocks:
        obj = module
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {model}.{name}, which does not exist"
            obj = getattr(obj, part)
    tree = ast.parse((ROOT / test_file).read_text())
    tests = [n.name.lower() for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
    for term in expr.split(" or "):  # pytest -k: a case-insensitive substring of a test's name
        assert any(term.strip().lower() in t for t in tests), f"-k {term!r} selects no test in {test_file}"


def test_no_paths_a_clone_lacks():
    for path in [ROOT / "README.md", *(ROOT / f"{m}.py" for m in MODEL_FILES)]:
        assert "../shared" not in path.read_text(), f"{path.name} points at ../shared, which a clone does not have"
