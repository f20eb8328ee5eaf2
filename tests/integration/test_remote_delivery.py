"""A whole serpentmail server delivering to other serpentmail servers by MX lookup.

The sending server's ``[dns] nameservers`` point at the sandbox DNS server; the receiving
servers are full instances on other 127.0.5.x addresses, all on one delivery port (as MX
hosts on the internet all listen on 25). A user submits over STARTTLS + AUTH; the queue
looks up the MX records, finds the preferred exchanger down, falls back to the next one.
"""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from serpentmail.config import Config, DNSConfig, Endpoint, Listener
from serpentmail.sandbox.dns import DNSServer, running_dns
from tests.helpers import ServerThread, add_user, maildir_files, make_config, running_server

DNS_HOST = "127.0.5.1"
YAHOO = "127.0.5.11"
MX1, MX2 = "127.0.5.12", "127.0.5.13"
BODY = b"Subject: hello Winview\r\n\r\nDear Wendy,\r\n.a line with a dot\r\nBill\r\n"


def _common_port() -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 60000)
        ok = True
        for host in (MX1, MX2):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port")


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _zones() -> dict[str, dict[str, list[str]]]:
    return {
        "winview.test": {"MX": ["10 mx1.winview.test", "20 mx2.winview.test"]},
        "mx1.winview.test": {"A": [MX1]},
        "mx2.winview.test": {"A": [MX2]},
    }


def _yahoo(tmp_path: Path, dns: DNSServer, port: int) -> Config:
    cfg = make_config(tmp_path / "yahoo", YAHOO, listeners=("smtp", "submission"), hostname="mail.yahoo.test")
    cfg = replace(cfg, dns=DNSConfig((Endpoint(DNS_HOST, dns.port),), timeout=1.0),
                  delivery=replace(cfg.delivery, port=port, connect_timeout=1.0, retry_schedule=(0.5,)))
    add_user(cfg, "bill@yahoo.test", "billpw")
    return cfg


def _winview(tmp_path: Path, name: str, host: str, port: int) -> Config:
    cfg = make_config(tmp_path / name, host, listeners=("smtp",), hostname=f"{name}.winview.test")
    cfg = replace(cfg, smtp=Listener((Endpoint(host, port),)))
    add_user(cfg, "wendy@winview.test")
    return cfg


def _submit(yahoo: ServerThread, rcpt: str) -> None:
    with smtplib.SMTP(*yahoo.endpoint("submission"), timeout=10) as c:
        c.starttls(context=_tls())
        c.login("bill@yahoo.test", "billpw")
        assert c.sendmail("bill@yahoo.test", [rcpt], BODY) == {}


def test_submitted_message_goes_to_second_mx_when_first_is_down(tmp_path: Path) -> None:
    port = _common_port()
    with running_dns(DNS_HOST, 0, _zones()) as dns:
        mx2 = _winview(tmp_path, "mx2", MX2, port)
        with running_server(mx2), running_server(_yahoo(tmp_path, dns, port)) as yahoo:
            _submit(yahoo, "wendy@winview.test")
            _wait(lambda: len(maildir_files(mx2, "wendy@winview.test")) == 1)
        assert ("winview.test", "MX") in dns.queries
    data = maildir_files(mx2, "wendy@winview.test")[0].read_bytes()
    assert data.endswith(BODY)
    # Two trace fields: the submission hop at yahoo, then the MX hop at mx2 (over STARTTLS).
    assert data.count(b"Received: ") == 2 and b"by mx2.winview.test (serpentmail) with ESMTPS " in data
    assert b"from mail.yahoo.test" in data


def test_all_mx_down_then_retried_and_delivered_when_one_returns(tmp_path: Path) -> None:
    port = _common_port()
    with running_dns(DNS_HOST, 0, _zones()) as dns, running_server(_yahoo(tmp_path, dns, port)) as yahoo:
        _submit(yahoo, "wendy@winview.test")
        # Both exchangers refuse connections: the queue keeps it and retries.
        _wait(lambda: sum(1 for q in dns.queries if q == ("winview.test", "MX")) >= 2)
        mx1 = _winview(tmp_path, "mx1", MX1, port)
        with running_server(mx1):
            _wait(lambda: len(maildir_files(mx1, "wendy@winview.test")) == 1)
        assert maildir_files(mx1, "wendy@winview.test")[0].read_bytes().endswith(BODY)


def test_nonexistent_domain_bounces_to_the_sender(tmp_path: Path) -> None:
    port = _common_port()
    with running_dns(DNS_HOST, 0, _zones()) as dns:
        yahoo_cfg = _yahoo(tmp_path, dns, port)
        with running_server(yahoo_cfg) as yahoo:
            _submit(yahoo, "someone@nowhere.test")
            _wait(lambda: len(maildir_files(yahoo_cfg, "bill@yahoo.test")) == 1)
    bounce = maildir_files(yahoo_cfg, "bill@yahoo.test")[0].read_bytes()
    assert b"Couldn't find host named nowhere.test" in bounce
    assert b"Final-Recipient: rfc822; someone@nowhere.test" in bounce
