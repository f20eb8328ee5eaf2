"""Envelope path parsing (RFC 5321 §4.1.2): what is accepted, what is refused, and that no
address trick changes which domain an address belongs to."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serpentmail.proto.address import NULL, Address, AddressError, parse_mailbox, parse_path


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("<bill@winview.test>", "bill", "winview.test"),
        ("<Bill@WinView.TEST>", "Bill", "winview.test"),  # domain lower-cased, local part kept
        ("<bill@winview.test.>", "bill", "winview.test"),  # trailing root dot
        ("bill@winview.test", "bill", "winview.test"),  # bare, no brackets (lenient like Postfix)
        ("  <bill@winview.test>", "bill", "winview.test"),
        ("<first.last+tag@winview.test>", "first.last+tag", "winview.test"),
        ("<user%other@winview.test>", "user%other", "winview.test"),  # percent hack stays local
        ("<other!user@winview.test>", "other!user", "winview.test"),  # bang path stays local
        ('<"user@other"@winview.test>', '"user@other"', "winview.test"),  # quoted '@' stays local
        ('<"a b\\"c"@winview.test>', '"a b\\"c"', "winview.test"),
        ('<"x>y"@winview.test>', '"x>y"', "winview.test"),  # '>' inside quotes does not close
        ("<@winview.test:user@other.test>", "user", "other.test"),  # source route stripped
        ("<@a.test,@b.test:user@other.test>", "user", "other.test"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<j\u00f6rg@b\u00fccher.test>", "j\u00f6rg", "b\u00fccher.test"),
    ],
)
def test_valid_paths(text: str, local: str, domain: str) -> None:
    addr, params = parse_path(text, allow_null=False)
    assert (addr.local, addr.domain) == (local, domain)
    assert params == {}


@pytest.mark.parametrize(
    "text",
    [
        "<>x", "<", "<bill>", "<@winview.test>", "<bill@>", "<bill@@winview.test>", "<a@b@winview.test>",
        "<.bill@winview.test>", "<bill.@winview.test>", "<bi..ll@winview.test>", "<bill@-x.test>",
        "<bill@x-.test>", "<bill@x..test>", "<bill@win view.test>", "<bi ll@winview.test>",
        '<"unterminated@winview.test>', "<@winview.test,user@other.test>", "<bill@[bad]x>",
        "<" + "a" * 65 + "@winview.test>", "<a@" + "b" * 250 + ".test>", "<a@b.test> BAD^PARAM",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text, allow_null=False)


def test_null_path() -> None:
    assert parse_path("<>", allow_null=True) == (NULL, {})
    assert NULL.is_null and str(NULL) == ""
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False)


def test_parameters() -> None:
    addr, params = parse_path("<a@b.test> size=100 BODY=8BITMIME SMTPUTF8", allow_null=True)
    assert params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert addr == Address("a", "b.test")


def test_bare_postmaster_only_where_allowed() -> None:
    assert parse_path("<postmaster>", allow_null=False, allow_bare_postmaster=True)[0] == Address("postmaster", "")
    assert parse_path("<POSTMASTER>", allow_null=False, allow_bare_postmaster=True)[0].local == "postmaster"
    with pytest.raises(AddressError):
        parse_path("<postmaster>", allow_null=False)


def test_key_is_case_insensitive() -> None:
    assert parse_mailbox("Bill@WinView.Test").key == parse_mailbox("bill@winview.test").key
    assert str(Address("postmaster", "")) == "postmaster"
    assert not Address("j\u00f6rg", "x.test").is_ascii


@given(st.text(max_size=300))
def test_parse_never_raises_anything_but_address_error(text: str) -> None:
    for allow_null in (True, False):
        try:
            addr, _ = parse_path(text, allow_null=allow_null, allow_bare_postmaster=True)
        except AddressError:
            continue
        # an accepted address has exactly one domain and it is what follows the last '@'
        # outside a quoted local part
        if addr.domain:
            assert "@" not in addr.domain
