"""``serpentmail mx DOMAIN``: the nslookup step, through the configured (sandbox) resolver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from serpentmail.cli import main
from serpentmail.sandbox.dns import DNSServer, running_dns


@pytest.fixture
def config(tmp_path: Path) -> Iterator[tuple[Path, DNSServer]]:
    with running_dns("127.0.5.1", 0, {
        "winview.test": {"MX": ["20 mx2.winview.test", "10 mx1.winview.test"]},
        "mx1.winview.test": {"A": ["127.0.5.2"]},
        "mx2.winview.test": {"A": ["127.0.5.3"]},
        "implicit.test": {"A": ["127.0.5.4"]},
        "nomail.test": {"MX": ["0 ."]},
        "self.test": {"MX": ["10 me.test"]},
        "me.test": {"A": ["127.0.5.5"]},
    }) as dns:
        dns.set_mode("broken.test", "servfail")
        path = tmp_path / "serpentmail.toml"
        path.write_text(f'hostname = "me.test"\ndata_dir = "{tmp_path / "data"}"\n'
                        f'[dns]\nnameservers = ["{dns.endpoint}"]\ntimeout = "1s"\n')
        yield path, dns


@pytest.mark.parametrize("domain,code,kind,action", [
    ("winview.test", 0, "mx", "deliver"),
    ("implicit.test", 0, "implicit", "implicit MX"),
    ("nomail.test", 1, "null", "null MX"),
    ("nowhere.test", 1, "nxdomain", "does not exist"),
    ("broken.test", 2, "tempfail", "temporary failure"),
    ("self.test", 1, "mx", "loop"),
])
def test_mx_json(config: tuple[Path, DNSServer], capsys: pytest.CaptureFixture[str], domain: str, code: int,
                 kind: str, action: str) -> None:
    path, _ = config
    assert main(["-c", str(path), "mx", domain, "--json"]) == code
    out = json.loads(capsys.readouterr().out)
    assert (out["domain"], out["kind"], out["action"]) == (domain, kind, action)
    if domain == "winview.test":
        assert [(e["preference"], e["exchanger"], e["addresses"]) for e in out["exchangers"]] == [
            (10, "mx1.winview.test", ["127.0.5.2"]), (20, "mx2.winview.test", ["127.0.5.3"])]


def test_mx_table(config: tuple[Path, DNSServer], capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = config
    assert main(["-c", str(path), "mx", "winview.test"]) == 0
    out = capsys.readouterr().out
    assert "mx1.winview.test" in out and "127.0.5.3" in out and "deliver to mx1.winview.test first" in out
    assert main(["-c", str(path), "mx", "nowhere.test"]) == 1
    assert "Couldn't find host named nowhere.test" in capsys.readouterr().out
