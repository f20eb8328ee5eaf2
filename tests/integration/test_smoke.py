"""The first path of the mission: an SMTP client delivers to a local user's Maildir."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.helpers import add_user, maildir_files, make_config, running_server


def test_message_lands_in_maildir_byte_for_byte(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", "127.0.0.2")
    add_user(cfg, "bill@winview.test")
    body = b"Subject: hi\r\n\r\nhello\r\n..dot-stuffed line\r\nend\r\n"
    with running_server(cfg) as srv, smtplib.SMTP(*srv.endpoint("smtp")) as c:
        c.ehlo("client.test")
        assert c.sendmail("a@b.test", ["bill@winview.test"], body) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            c.sendmail("a@b.test", ["x@elsewhere.test"], body)
        assert exc.value.recipients["x@elsewhere.test"][0] == 554
    files = maildir_files(cfg, "bill@winview.test")
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.startswith(b"Return-Path: <a@b.test>\r\nReceived: from client.test")
    # smtplib dot-stuffs ".." into "...", the server undoes it: the body is what was sent.
    assert data.endswith(body)


@pytest.mark.parametrize("journal", [True, False])
def test_both_durability_paths_deliver_to_several_mailboxes(tmp_path: Path, journal: bool) -> None:
    """``journal = true`` (the default) and ``false`` (fsync per file) store the same bytes, for one
    mailbox and for several, and a clean stop leaves nothing for the next start to replay."""
    cfg = make_config(tmp_path / "data", "127.0.0.2", journal=journal)
    add_user(cfg, "bill@winview.test")
    add_user(cfg, "ann@winview.test")
    body = b"Subject: paths\r\n\r\nsame bytes either way\r\n"
    with running_server(cfg) as srv, smtplib.SMTP(*srv.endpoint("smtp")) as c:
        assert c.sendmail("a@b.test", ["bill@winview.test"], body) == {}
        assert c.sendmail("a@b.test", ["bill@winview.test", "ann@winview.test"], body) == {}
    bill, ann = maildir_files(cfg, "bill@winview.test"), maildir_files(cfg, "ann@winview.test")
    assert len(bill) == 2 and len(ann) == 1
    assert all(f.read_bytes().endswith(body) for f in bill + ann)
    log = cfg.data_dir / "journal" / "w0.log"
    assert log.exists() == journal
    if journal:
        from serpentmail.storage.journal import HEADER, records

        # created (generation 1), replayed at open (2), and started over at the stop's
        # checkpoint (3): it carried the messages, and nothing is left pending
        assert HEADER.unpack(log.read_bytes()[:HEADER.size])[1] == 3
        assert list(records(log)) == []
