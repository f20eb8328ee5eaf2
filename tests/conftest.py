"""Fixtures for every test."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from serpentmail.storage.maildir import SpoolPool


@pytest.fixture(autouse=True)
def _pools_let_go_of_their_spares(request: pytest.FixtureRequest) -> Iterator[None]:
    """A spool pool keeps its spare files open, refilled in its own thread (which keeps the
    pool alive). A server closes its pools at stop; a test that makes a QueueStore (whose
    envelope spares are such a pool) or a pool of its own may not, and a whole run held over
    a thousand descriptors by its end. After each test of a module that uses either, the
    pools under the test's own temporary directory are closed."""
    module = request.module
    if not (hasattr(module, "QueueStore") or hasattr(module, "SpoolPool")):
        yield
        return
    root = os.fspath(request.getfixturevalue("tmp_path"))
    yield
    for obj in gc.get_objects():
        if isinstance(obj, SpoolPool) and os.fspath(obj.tmp_dir).startswith(root):
            obj.close()
