"""The mypyc build of setup.py: what it compiles, and that a compiled run really is one."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import serpentmail
from serpentmail import COMPILED_MODULES, compiled_modules

ROOT = Path(__file__).resolve().parents[2]


def _setup_compiled() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("setup.py has no COMPILED list")


def test_the_package_names_the_modules_setup_py_compiles() -> None:
    paths = _setup_compiled()
    names = [p.removeprefix("src/serpentmail/").removesuffix(".py").replace("/", ".") for p in paths]
    assert sorted(names) == sorted(COMPILED_MODULES)
    for p in paths:
        assert (ROOT / p).is_file(), p


def test_compiled_modules_are_all_or_none() -> None:
    # setup.py builds them together (one support library) or not at all.
    assert compiled_modules() in ([], list(COMPILED_MODULES))


@pytest.mark.skipif(not os.environ.get("SERPENTMAIL_EXPECT_COMPILED"),
                    reason="only in scripts/test.sh's run against the compiled build")
def test_this_run_imports_the_compiled_build() -> None:
    # scripts/test.sh sets SERPENTMAIL_EXPECT_COMPILED when its build compiled the modules: the
    # suite must then really run them, not the sources of the editable install.
    assert compiled_modules() == list(COMPILED_MODULES)
    assert not str(Path(serpentmail.__file__).resolve()).startswith(str(ROOT / "src"))
