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
