"""setup.py without a working C compiler: the install still succeeds, says why in one warning,
and holds only the plain-Python modules (no extension, no mypyc support library), which run.

Built as scripts/test.sh and users build it (pip's isolated build environment: setuptools and
mypy from the package index or pip's cache); CC points at /bin/false, so mypyc generates its C
and the compiler fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_c_compiler_gives_a_working_plain_python_install(tmp_path: Path) -> None:
    target = tmp_path / "site"
    env = dict(os.environ, CC="/bin/false")
    env.pop("SERPENTMAIL_PURE", None)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--disable-pip-version-check", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    assert "serpentmail: the C build failed" in out
    assert "installing the pure-Python modules" in out
    assert not list(target.rglob("*.so")), "a compiled file was installed"
    assert (target / "serpentmail" / "server" / "smtp.py").is_file()
    check = subprocess.run(
        [sys.executable, "-c", "import serpentmail, serpentmail.cli; print(serpentmail.__file__, serpentmail.compiled_modules())"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)), timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    where, modules = check.stdout.split(" ", 1)
    assert Path(where).is_relative_to(target)
    assert modules.strip() == "[]"
