"""Byte-exact scripted SMTP sessions against the in-process server over a raw socket.

A dialog file (``tests/dialogs/*.txt``) is a list of lines:

* ``# ...`` comments and blank lines are ignored;
* ``@domain D``, ``@user ADDRESS``, ``@alias ALIAS TARGET``, ``@limit NAME=INT`` set up the
  server before the session starts (the server's hostname is ``mx.test``);
* ``C: text`` is a line the client sends, with CRLF appended. Consecutive ``C:`` lines are
  sent in one packet (pipelining); ``C\\: text`` is the same, with ``\\r``, ``\\n`` and
  ``\\xNN`` escapes and no CRLF appended, for bare CR/LF payloads;
* ``S: text`` is the exact reply line the server must send; ``*`` matches any run of
  characters (for queue ids and dates);
* ``CLOSED`` expects the server to close the connection;
* ``@delivered ADDRESS N`` checks, after the session, that ADDRESS's Maildir ``new/`` holds
  N messages; ``@relayed 0`` checks that nothing was queued for a remote domain.
"""

from __future__ import annotations

import codecs
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from tests.helpers import maildir_files, make_config, running_server

HERE = Path(__file__).parent
DIALOGS = sorted(HERE.glob("*.txt"))


@dataclass
class Script:
    setup: list[tuple[str, list[str]]] = field(default_factory=list)
    steps: list[tuple[str, bytes | str]] = field(default_factory=list)  # ("send", bytes) / ("expect", pattern) / ("closed", "")
    checks: list[tuple[str, list[str]]] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)


def parse(path: Path) -> Script:
    sc = Script()
    pending = b""
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("C: ") or line == "C:":
            pending += line[3:].encode("utf-8") + b"\r\n"
            continue
        if line.startswith("C\\: "):
            pending += codecs.escape_decode(line[4:].encode("utf-8"))[0]
            continue
        if pending:
            sc.steps.append(("send", pending))
            pending = b""
        if line.startswith("S: "):
            sc.steps.append(("expect", line[3:]))
        elif line == "CLOSED":
            sc.steps.append(("closed", ""))
        elif line.startswith("@"):
            word, *args = line[1:].split()
            if word in ("domain", "user", "alias"):
                sc.setup.append((word, args))
            elif word == "limit":
                name, _, value = args[0].partition("=")
                sc.limits[name] = int(value)
            elif word in ("delivered", "relayed"):
                sc.checks.append((word, args))
            else:
                raise ValueError(f"{path.name}:{n}: unknown directive {word!r}")
        else:
            raise ValueError(f"{path.name}:{n}: cannot parse {line!r}")
    if pending:
        sc.steps.append(("send", pending))
    return sc


def matches(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters; everything else is literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text, re.DOTALL) is not None


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path, tmp_path: Path) -> None:
    sc = parse(path)
    cfg = make_config(tmp_path / "data", "127.0.6.1", listeners=("smtp",), limits=sc.limits or None)
    db = AccountDB(cfg.db_path)
    for word, args in sc.setup:
        if word == "domain":
            db.ensure_domain(args[0])
        elif word == "user":
            db.ensure_domain(args[0].rpartition("@")[2])
            db.add_user(args[0], "secret")
        else:
            db.add_alias(args[0], args[1])
    db.close()
    transcript: list[str] = []
    with running_server(cfg) as srv, socket.create_connection(srv.endpoint("smtp"), timeout=10) as sock:
        reader = sock.makefile("rb")
        for kind, arg in sc.steps:
            if kind == "send":
                assert isinstance(arg, bytes)
                transcript.append(f"C: {arg!r}")
                sock.sendall(arg)
            elif kind == "expect":
                got = reader.readline()
                transcript.append(f"S: {got!r}")
                assert got.endswith(b"\r\n"), "\n".join(transcript)
                text = got[:-2].decode("utf-8")
                assert matches(str(arg), text), "\n".join([*transcript, f"expected: {arg}"])
            else:
                rest = reader.read()
                assert rest == b"", "\n".join([*transcript, f"expected close, got {rest!r}"])
        queue_files = [p for p in (cfg.data_dir / "queue").rglob("*") if p.is_file()]
    for word, args in sc.checks:
        if word == "delivered":
            assert len(maildir_files(cfg, args[0])) == int(args[1]), args
        else:
            assert len(queue_files) == int(args[0])


def test_parser_escapes() -> None:
    sc = Script()
    p = HERE / "_escape_check.tmp"
    try:
        p.write_text("C: NOOP\nC\\: a\\r\\n.\\nb\\x00\nS: 250 *\n")
        sc = parse(p)
    finally:
        p.unlink()
    assert sc.steps == [("send", b"NOOP\r\na\r\n.\nb\x00"), ("expect", "250 *")]
