"""DATA's bare CR/LF check: the C version (serpentmail._scan, built by setup.py) and the
Python one give the same answers, and a compiled build really uses the C one."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serpentmail.proto import smtp_server

try:
    from serpentmail._scan import bare_newline as c_bare_newline
except ImportError:
    c_bare_newline = None

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def reference(data: bytes) -> bool:
    """The rule itself (RFC 5321 §2.3.8), written the slow and obvious way."""
    return _BARE.search(data) is not None


CASES = [b"", b"abc", b"\r\n", b"a\r\nb\r\n", b"\r", b"\n", b"a\rb\r\n", b"a\nb\r\n", b"\r\r\n",
         b"\r\n\n", b"\n\r", b"x\r\n\r", b".\r\n", b"\r\n.\r\n", b"a" * 5000 + b"\n", b"a" * 5000 + b"\r\n"]
_octets = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b"\x00", b"\xff"]), max_size=60).map(b"".join)


@pytest.mark.parametrize("data", CASES)
def test_python_check_follows_the_rule(data: bytes) -> None:
    assert smtp_server._has_bare_newline_py(data) is reference(data)


@given(_octets)
def test_python_check_follows_the_rule_on_any_octets(data: bytes) -> None:
    assert smtp_server._has_bare_newline_py(data) is reference(data)


@pytest.mark.skipif(c_bare_newline is None, reason="serpentmail._scan is not built (editable install)")
@given(_octets)
def test_c_check_agrees(data: bytes) -> None:
    assert c_bare_newline is not None
    assert c_bare_newline(data) is reference(data)
    assert c_bare_newline(bytearray(data)) is reference(data)


@pytest.mark.skipif(c_bare_newline is None, reason="serpentmail._scan is not built (editable install)")
@pytest.mark.parametrize("data", CASES)
def test_c_check_cases(data: bytes) -> None:
    assert c_bare_newline is not None
    assert c_bare_newline(data) is reference(data)


@pytest.mark.skipif(c_bare_newline is None, reason="serpentmail._scan is not built (editable install)")
def test_c_check_refuses_what_is_not_a_buffer() -> None:
    assert c_bare_newline is not None
    with pytest.raises(TypeError):
        c_bare_newline("text")  # type: ignore[arg-type]


@pytest.mark.skipif(not os.environ.get("SERPENTMAIL_EXPECT_COMPILED"),
                    reason="only in scripts/test.sh's run against the compiled build")
def test_the_compiled_build_uses_the_c_check() -> None:
    assert c_bare_newline is not None
    assert smtp_server._has_bare_newline is c_bare_newline
