"""RFC 3464 DSNs, parsed back with the stdlib email package field by field."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import Message

import pytest

from serpentmail.message.dsn import DSNRecipient, build_dsn, plain_reason, status_of

NOW = 1_700_000_000.0
ORIGINAL = b"From: bill@home.test\r\nTo: x@nowhere.test\r\nSubject: plans\r\nMessage-ID: <m1@home.test>\r\n\r\nsecret body\r\n"


def _parse(data: bytes) -> Message:
    return email.message_from_bytes(data)


def _bounce(**kw: object) -> bytes:
    args: dict[str, object] = dict(
        reporting_mta="mx.home.test", original_sender="bill@home.test", original_id="ABC123456789",
        arrival=NOW - 60, now=NOW, action="failed", original_headers=ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n",
        recipients=[
            DSNRecipient("x@nowhere.test", "550 5.1.2 Host or domain name not found", None, "smtp", NOW - 1),
            DSNRecipient("bob@far.test", "550 5.1.1 <bob@far.test>: user unknown", "mx1.far.test", "smtp", NOW - 2),
        ],
    )
    args.update(kw)
    return build_dsn(**args)  # type: ignore[arg-type]


def test_structure_and_headers() -> None:
    data = _bounce()
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert all(len(line) < 998 for line in data.split(b"\r\n"))
    msg = _parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert email.utils.parseaddr(msg["From"])[1] == "MAILER-DAEMON@mx.home.test"
    assert email.utils.parseaddr(msg["To"])[1] == "bill@home.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] and msg["Date"]
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_human_readable_part_says_plainly_what_happened() -> None:
    msg = _parse(_bounce())
    text = msg.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
    assert "<x@nowhere.test>: Couldn't find host named nowhere.test" in text
    assert "<bob@far.test>: user does not exist" in text
    assert "mx1.far.test said: 550 5.1.1 <bob@far.test>: user unknown" in text


def test_delivery_status_fields() -> None:
    msg = _parse(_bounce())
    status_part = msg.get_payload()[1]  # type: ignore[index]
    blocks = status_part.get_payload()  # type: ignore[union-attr]
    # the stdlib parses message/delivery-status into one Message per field block
    assert len(blocks) == 3
    per_msg, r1, r2 = blocks
    assert per_msg["Reporting-MTA"] == "dns; mx.home.test"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == NOW - 60
    assert r1["Final-Recipient"] == "rfc822; x@nowhere.test"
    assert (r1["Action"], r1["Status"]) == ("failed", "5.1.2")
    assert r1["Remote-MTA"] is None
    assert r1["Diagnostic-Code"] == "smtp; 550 5.1.2 Host or domain name not found"
    assert r2["Final-Recipient"] == "rfc822; bob@far.test"
    assert (r2["Action"], r2["Status"]) == ("failed", "5.1.1")
    assert r2["Remote-MTA"] == "dns; mx1.far.test"
    assert r2["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@far.test>: user unknown"
    assert email.utils.parsedate_to_datetime(r2["Last-Attempt-Date"]).timestamp() == NOW - 2


def test_original_headers_or_whole_message() -> None:
    headers_only = _parse(_bounce()).get_payload()[2]  # type: ignore[index]
    raw = headers_only.get_payload()  # type: ignore[union-attr]
    assert "Subject: plans" in raw and "secret body" not in raw
    whole = _parse(_bounce(original_message=ORIGINAL)).get_payload()[2]  # type: ignore[index]
    assert whole.get_content_type() == "message/rfc822"  # type: ignore[union-attr]
    inner = whole.get_payload()[0]  # type: ignore[union-attr,index]
    assert inner["Subject"] == "plans" and "secret body" in inner.get_payload()


def test_delayed_warning() -> None:
    msg = _parse(_bounce(action="delayed", will_retry_until=NOW + 86400,
                         recipients=[DSNRecipient("x@far.test", "451 4.4.1 connection refused", "mx.far.test")]))
    assert "Delayed" in msg["Subject"]
    text = msg.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
    assert "WARNING ONLY" in text
    r = msg.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
    assert (r["Action"], r["Status"]) == ("delayed", "4.4.1")
    assert email.utils.parsedate_to_datetime(r["Will-Retry-Until"]).timestamp() == NOW + 86400


def test_reply_cannot_inject_headers_or_boundaries() -> None:
    evil = "550 5.7.1 no\r\nX-Injected: yes\r\n--=_serpentmail_x--"
    data = _bounce(recipients=[DSNRecipient("x@far.test", evil, "mx.far.test")], boundary="=_serpentmail_x")
    msg = _parse(data)
    assert len(msg.get_payload()) == 3  # type: ignore[arg-type]
    r = msg.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
    assert r["X-Injected"] is None
    assert r["Diagnostic-Code"].startswith("smtp; 550 5.7.1 no X-Injected: yes")


@pytest.mark.parametrize(
    ("reply", "action", "expired", "status"),
    [
        ("550 5.1.1 user unknown", "failed", False, "5.1.1"),
        ("554 no such thing", "failed", False, "5.0.0"),
        ("451 4.4.1 refused", "failed", True, "4.4.1"),
        ("connection timed out", "failed", True, "4.4.7"),
        ("Host or domain name not found", "failed", False, "5.0.0"),
        ("", "delayed", False, "4.0.0"),
        ("556 5.1.10 null MX", "failed", False, "5.1.10"),
    ],
)
def test_status_of(reply: str, action: str, expired: bool, status: str) -> None:
    assert status_of(reply, action, expired=expired) == status  # type: ignore[arg-type]


def test_plain_reasons() -> None:
    assert plain_reason(DSNRecipient("a@nx.test", "Host or domain name not found"), "failed") == "Couldn't find host named nx.test"
    assert "null MX" in plain_reason(DSNRecipient("a@n.test", "556 5.1.10 null MX"), "failed")
    assert plain_reason(DSNRecipient("a@b.test", "550 5.1.1 nope"), "failed") == "user does not exist"
    assert "giving up" in plain_reason(DSNRecipient("a@b.test", "451 4.4.1 x", expired=True), "failed", "5 days")
