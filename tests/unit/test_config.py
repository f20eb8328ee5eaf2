"""The TOML config: defaults, sizes and durations, listeners, and errors that name the key,
the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from serpentmail.config import (
    ConfigError,
    Endpoint,
    embedded_default,
    load,
    parse_duration,
    parse_endpoint,
    parse_size,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mail.toml"
    p.write_text(text)
    return p


def test_the_issue_example(tmp_path: Path) -> None:
    p = write(tmp_path, '''
hostname = "mx1.winview.test"
data_dir = "/var/lib/serpentmail"
[smtp]
listen = ["0.0.0.0:25"]
[submission]
listen = ["0.0.0.0:587"]
[submissions]
listen = ["0.0.0.0:465"]
[pop3]
listen = ["0.0.0.0:110"]
[pop3s]
listen = ["0.0.0.0:995"]
[dns]
nameservers = ["127.0.0.1:5353"]
[delivery]
port = 25
[limits]
max_message_size = "25MB"
max_recipients = 100
idle_timeout = "5m"
max_connections = 1000
max_connections_per_ip = 50
''')
    cfg = load(p)
    assert cfg.hostname == "mx1.winview.test"
    assert cfg.data_dir == Path("/var/lib/serpentmail")
    assert cfg.smtp.listen == (Endpoint("0.0.0.0", 25),)
    assert cfg.pop3s.listen == (Endpoint("0.0.0.0", 995),)
    assert cfg.dns.nameservers == (Endpoint("127.0.0.1", 5353),)
    assert cfg.limits.max_message_size == 25_000_000
    assert cfg.limits.idle_timeout == 300.0
    assert cfg.limits.max_connections_per_ip == 50
    assert cfg.source == p


def test_every_key_has_a_default(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert cfg.smtp.listen == (Endpoint("0.0.0.0", 25),)
    assert cfg.submission.listen == (Endpoint("0.0.0.0", 587),)
    assert cfg.limits.max_recipients == 100
    assert cfg.hostname
    assert cfg.journal is True


def test_dns_cache_cap_is_a_duration_and_zero_turns_the_cache_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).dns.cache_max_ttl == 3600.0
    assert load(write(tmp_path, '[dns]\ncache_max_ttl = "10m"\n')).dns.cache_max_ttl == 600.0
    assert load(write(tmp_path, "[dns]\ncache_max_ttl = 0\n")).dns.cache_max_ttl == 0.0


def test_login_cache_ttl_is_a_duration_and_zero_turns_it_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).limits.auth_cache_ttl == 300.0
    assert load(write(tmp_path, '[limits]\nauth_cache_ttl = "1h"\n')).limits.auth_cache_ttl == 3600.0
    assert load(write(tmp_path, "[limits]\nauth_cache_ttl = 0\n")).limits.auth_cache_ttl == 0.0


def test_journal_can_be_turned_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, "journal = false\n")).journal is False


def test_empty_listen_list_turns_a_listener_off(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "[submission]\nlisten = []\n[pop3]\nlisten = []\n"))
    assert cfg.submission.listen == ()
    assert cfg.pop3.listen == ()
    assert cfg.smtp.listen  # the others keep their defaults


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, 'data_dir = "data"\n'))
    assert cfg.data_dir == tmp_path / "data"


def test_embedded_default() -> None:
    cfg = embedded_default()
    assert cfg.data_dir == Path("serpentmail-data").absolute()
    assert cfg.default_domains == ("localhost",)
    ports = {k: getattr(cfg, k).listen[0] for k in ("smtp", "submission", "submissions", "pop3", "pop3s")}
    assert ports == {"smtp": Endpoint("127.0.0.1", 2525), "submission": Endpoint("127.0.0.1", 2587),
                     "submissions": Endpoint("127.0.0.1", 2465), "pop3": Endpoint("127.0.0.1", 2110),
                     "pop3s": Endpoint("127.0.0.1", 2995)}


@pytest.mark.parametrize(("text", "value"), [
    ("25MB", 25_000_000), ("25mb", 25_000_000), ("10MiB", 10 * 1024 * 1024), ("512k", 512_000),
    ("1.5KiB", 1536), ("100", 100), ("100 B", 100), ("1G", 10**9), (4096, 4096),
])
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MB", "25 XB", "-5", -5, "1e3", True, 1.5, None, [1]])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "value"), [
    ("5m", 300.0), ("30s", 30.0), ("2h", 7200.0), ("5d", 432000.0), ("250ms", 0.25), ("10", 10.0), (10, 10.0),
    (0.5, 0.5), ("1.5m", 90.0),
])
def test_durations(text: object, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", -1, -0.5, "m", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "ep"), [
    ("127.0.0.1:25", Endpoint("127.0.0.1", 25)), ("[::1]:587", Endpoint("::1", 587)),
    ("0.0.0.0:0", Endpoint("0.0.0.0", 0)),
])
def test_endpoints(text: str, ep: Endpoint) -> None:
    assert parse_endpoint(text) == ep


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":25", "::1:25", 25])
def test_bad_endpoints(text: object) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


ERRORS = [
    # (toml, key named in the error, line)
    ('hostname = "a"\nbogus = 1\n', "bogus", 2),
    ('hostname = 5\n', "hostname", 1),
    ('\n\n[limits]\nmax_recipients = 10\nmax_recipents = 5\n', "limits.max_recipents", 5),
    ('[limits]\nmax_message_size = "lots"\n', "limits.max_message_size", 2),
    ('[limits]\nidle_timeout = "5 minutes"\n', "limits.idle_timeout", 2),
    ('[limits]\nidle_timeout = -5\n', "limits.idle_timeout", 2),
    ('[limits]\nauth_cache_ttl = "forever"\n', "limits.auth_cache_ttl", 2),
    ('[limits]\nmax_message_size = -1\n', "limits.max_message_size", 2),
    ('[limits]\nmax_recipients = -1\n', "limits.max_recipients", 2),
    ('[limits]\nmax_recipients = "ten"\n', "limits.max_recipients", 2),
    ('[smtp]\nlisten = ["nonsense"]\n', "smtp.listen", 2),
    ('[smtp]\nlisten = "127.0.0.1:25"\n', "smtp.listen", 2),
    ('[smtp]\nlisten = []\nport = 25\n', "smtp.port", 3),
    ('smtp = "x"\n', "smtp", 1),
    ('hostname = "a"\n\n[nosuchsection]\nx = 1\n', "nosuchsection", 3),
    ('[log]\nformat = "xml"\n', "log.format", 2),
    ('[tls]\ncert = "/x.pem"\n', "tls.key", None),
    ('[dns]\nnameservers = "1.1.1.1"\n', "dns.nameservers", 2),
    ('[delivery]\nport = 70000\n', "delivery.port", 2),
    ('workers = 1\njournal = "yes"\n', "journal", 2),
]


@pytest.mark.parametrize(("text", "key", "line"), ERRORS)
def test_errors_name_key_file_and_line(tmp_path: Path, text: str, key: str, line: int | None) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(p)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'{key}'" in msg
    assert str(p) in msg
    if line is not None:
        assert msg.startswith(f"{p}:{line}: "), msg


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, 'hostname = "a"\n[limits\n')
    with pytest.raises(ConfigError) as exc:
        load(p)
    assert str(p) in str(exc.value) and "line 2" in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "nope.toml")
    assert "nope.toml" in str(exc.value)
