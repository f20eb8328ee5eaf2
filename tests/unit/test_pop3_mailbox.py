"""The POP3 maildrop (storage/mailbox.py): snapshot order, sizes and unique-ids from names,
UPDATE through the directory descriptors, and descriptor hygiene."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serpentmail.storage.mailbox import (
    MailboxInUse,
    _order_key,
    delivered_at,
    open_mailbox,
    uid_for,
    unique_part,
)

# --- the definitions the fast paths must agree with (as first written) -----------------------
_ORDER = re.compile(r"^(\d+)\.(\S*)")
_USEC = re.compile(r"M(\d+)")
_SEQ = re.compile(r"Q(\d+)")


def reference_order_key(name: str) -> tuple[int, int, int, str]:
    m = _ORDER.match(name)
    if m is None:
        return (0, 0, 0, name)
    rest = m.group(2).split(".", 1)[0]
    usec = _USEC.search(rest)
    seq = _SEQ.search(rest)
    return (int(m.group(1)), int(usec.group(1)) if usec else 0, int(seq.group(1)) if seq else 0, name)


def reference_uid(name: str) -> str:
    unique = name.split(":", 1)[0].split(",", 1)[0]
    if 0 < len(unique) <= 70 and all("!" <= ch <= "~" for ch in unique):
        return unique
    return "~" + hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


_pieces = st.sampled_from(["1700000000", ".", "M", "P", "Q", "12", "0", "x", " ", ",S=", ":2,", "é", "٣",
                           "\x7f", "~", "host", "\t", "Q7", "M5"])
names = st.one_of(st.lists(_pieces, max_size=12).map("".join), st.text(max_size=40))


@settings(max_examples=2000, deadline=None)
@given(names)
def test_order_key_and_uid_agree_with_the_reference(name: str) -> None:
    unique = unique_part(name)
    assert _order_key(unique) == reference_order_key(unique)
    assert uid_for(name) == reference_uid(name)


def _mk(d: Path, sub: str, name: str, body: bytes = b"x\r\n") -> None:
    (d / sub).mkdir(parents=True, exist_ok=True)
    (d / sub / name).write_bytes(body)


def test_snapshot_order_sizes_and_uids(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _mk(d, "new", "1700000002.M5P1Q9.h,S=100")
    _mk(d, "new", "1700000001.M7P1Q3.h,S=50")
    _mk(d, "cur", "1700000001.M7P1Q2.h,S=60:2,S")
    _mk(d, "new", "1700000001.M7P1Q2.h,S=60")  # same unique name as in cur/: cur/ wins
    _mk(d, "new", "legacy-name", b"12345")  # no ,S=: size by stat
    _mk(d, "new", ".hidden")
    with open_mailbox(d) as mb:
        assert [(e.sub, e.name) for e in mb.entries] == [
            ("new", "legacy-name"),
            ("cur", "1700000001.M7P1Q2.h,S=60:2,S"),
            ("new", "1700000001.M7P1Q3.h,S=50"),
            ("new", "1700000002.M5P1Q9.h,S=100"),
        ]
        assert mb.listing == [(5, "legacy-name"), (60, "1700000001.M7P1Q2.h"), (50, "1700000001.M7P1Q3.h"),
                              (100, "1700000002.M5P1Q9.h")]


def test_update_through_directory_descriptors(tmp_path: Path) -> None:
    d = tmp_path / "m"
    for i in range(5):
        _mk(d, "new", f"170000000{i}.M0P1Q{i}.h,S=3")
    _mk(d, "cur", "1600000000.M0P1Q0.h,S=3:2,S")
    with open_mailbox(d) as mb:
        assert os.read(mb.open_message_fd(1), 10) == b"x\r\n"
        mb.apply([0, 2, 3])  # the cur/ message and two from new/
    assert sorted(os.listdir(d / "new")) == []
    assert sorted(os.listdir(d / "cur")) == ["1700000000.M0P1Q0.h,S=3:2,S", "1700000003.M0P1Q3.h,S=3:2,S",
                                             "1700000004.M0P1Q4.h,S=3:2,S"]


def test_update_tolerates_files_removed_behind_its_back(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _mk(d, "new", "1700000000.M0P1Q0.h,S=3")
    _mk(d, "new", "1700000001.M0P1Q1.h,S=3")
    with open_mailbox(d) as mb:
        os.unlink(d / "new" / "1700000000.M0P1Q0.h,S=3")
        os.unlink(d / "new" / "1700000001.M0P1Q1.h,S=3")
        mb.apply([0])  # one marked, one to move: both already gone, no error
    assert os.listdir(d / "cur") == []


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_descriptors_are_released_on_close_and_on_in_use(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _mk(d, "new", "1700000000.M0P1Q0.h,S=3")
    before = _open_fds()
    mb = open_mailbox(d)
    with pytest.raises(MailboxInUse):
        open_mailbox(d)
    mb.close()
    mb.close()  # twice is fine
    assert _open_fds() == before
    with open_mailbox(d):  # and the lock is free again
        pass
    assert _open_fds() == before


def test_delivered_at_is_the_time_our_names_start_with() -> None:
    """What POP3's UPDATE uses to look only recent messages up in the delivery journals."""
    assert delivered_at("1795935976.M994120P6397Q1.mx.test,S=220") == 1795935976
    assert delivered_at("1795935976.M994120P6397Q1.mx.test,S=220:2,S") == 1795935976
    assert delivered_at("not-ours") == 0
