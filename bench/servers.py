"""The servers under test, each a private instance on loopback in a temp directory.

* :class:`Serpent`: ``serpentmail -c <tmp>/mail.toml serve`` (a subprocess, so its CPU time
  and memory can be read from /proc).
* :class:`Postfix`: a private Postfix instance (its own ``config_directory``, queue and data
  directories under the temp dir, started with ``postfix -c DIR``; the system's /etc/postfix
  instance is never started or changed), delivering with virtual(8) to a Maildir.
  With ``submission=True`` it also runs a submission smtpd (STARTTLS required, AUTH through
  its own :class:`DovecotAuth`, relaying only for authenticated clients).
* :class:`Dovecot`: a private ``dovecot -c <tmp>/dovecot.conf`` serving POP3 from a Maildir.
* :class:`DovecotAuth`: a private Dovecot running only its auth service, whose socket in the
  private Postfix's ``private/`` directory is that Postfix's SASL backend.

Both peers run as the packaged defaults plus what a private, loopback-only instance needs; the
mailboxes belong to ``nobody`` because neither peer delivers as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .common import (
    DOVECOT_IP,
    MAIL_GID,
    MAIL_UID,
    POSTFIX_IP,
    SERPENT_IP,
    Unavailable,
    free_port,
    run,
    tree_cpu,
    tree_pss_kib,
    wait_port,
    which,
)

DOMAIN = "bench.test"
USER = "u@bench.test"
PASSWORD = "bench-password"


def ensure_packages(console_print: object = print) -> None:
    """Install Postfix and Dovecot from Debian if missing, without starting system daemons."""
    missing = [pkg for pkg, binary in (("postfix", "smtp-source"), ("dovecot-pop3d", "dovecot"))
               if which(binary) is None or (pkg == "dovecot-pop3d" and not Path("/usr/lib/dovecot/pop3").exists())]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"missing {', '.join(missing)} and cannot apt-get install them (need root on Debian)")
    print_fn = console_print if callable(console_print) else print
    print_fn(f"installing {' '.join(missing)} from Debian (daemons are not started)...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = False
    if not policy.exists():  # forbid invoke-rc.d from starting the system instances
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created_policy = True
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=True, capture_output=True)
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)
    # In case a system instance did start (no policy-rc.d support): stop it, it is not ours.
    subprocess.run(["postfix", "stop"], check=False, capture_output=True)
    subprocess.run(["service", "dovecot", "stop"], check=False, capture_output=True)


def password_entry() -> str:
    """The bench user's password for a Dovecot passdb, hashed exactly as serpentmail hashes its
    users' (argon2id with serpentmail's parameters; Dovecot verifies the same string through
    libsodium). With ``{PLAIN}``, as before, every SMTP AUTH cost the peer nothing while it
    cost serpentmail one argon2 verification (about 38 ms of CPU here): 10 logins per
    submission run, a quarter of a millisecond per message on our side only."""
    from serpentmail.accounts.db import hash_password

    return "{ARGON2ID}" + hash_password(PASSWORD)


_graves = iter(range(1, 1 << 30))


def retire(maildir: Path, root: Path, *, uid: int = -1, gid: int = -1) -> None:
    """Empty a mailbox between runs by moving its directories aside (removed at the end).

    Deleting thousands of files right before a run would slow the next run's file creation on
    ext4 without a journal (the inode allocator skips recently deleted inodes, scanning them),
    a cost that belongs to neither server.
    """
    grave = root / "grave" / str(next(_graves))
    grave.mkdir(parents=True)
    for sub in ("new", "cur", "tmp"):
        d = maildir / sub
        if d.exists():
            d.rename(grave / sub)
        d.mkdir(mode=0o700, parents=True)
        if uid >= 0:
            os.chown(d, uid, gid)


class Serpent:
    name = "serpentmail"
    # `workers` in its config: "auto" (one process per CPU, the setting an administrator of a
    # multi-core machine would choose, as Postfix and Dovecot run many processes) or a number.
    workers = "auto"
    # The code it runs when start() names none: a directory put first on PYTHONPATH (a build
    # from bench.common.build_package), or None for whatever `python -m serpentmail` imports.
    code: Path | None = None

    def __init__(self, root: Path, *, pop3: bool = False, submission: bool = False,
                 sink: tuple[str, int] | None = None, dns: tuple[str, int] | None = None,
                 dns_cache: bool = True) -> None:
        """``sink``: relay everything there. With ``dns`` (a nameserver), no relay: remote mail
        goes by MX lookup through that nameserver to port ``sink[1]`` of the exchanger;
        ``dns_cache`` False sets ``[dns] cache_max_ttl = 0``."""
        self.root = root / "serpent"
        self.data = self.root / "data"
        self.ip = SERPENT_IP
        self.smtp_port = free_port(self.ip)
        self.pop3_port = free_port(self.ip) if pop3 else 0
        self.submission_port = free_port(self.ip) if submission else 0
        self.sink = sink
        self.dns = dns
        self.dns_cache = dns_cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.user_id = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "mail.toml"
        pop3 = f'["{self.ip}:{self.pop3_port}"]' if self.pop3_port else "[]"
        sub = f'["{self.ip}:{self.submission_port}"]' if self.submission_port else "[]"
        relay = ""
        if self.sink and self.dns:
            relay = (f'[delivery]\nport = {self.sink[1]}\n[dns]\nnameservers = ["{self.dns[0]}:{self.dns[1]}"]\n'
                     f'cache_max_ttl = {"3600" if self.dns_cache else "0"}\n')
        elif self.sink:
            relay = f'[delivery]\nrelay = "{self.sink[0]}:{self.sink[1]}"\nrelay_tls = "none"\n'
        workers = f'"{self.workers}"' if self.workers == "auto" else self.workers
        self.conf.write_text(textwrap.dedent(f"""\
            hostname = "mx.{DOMAIN}"
            data_dir = "{self.data}"
            workers = {workers}
            [smtp]
            listen = ["{self.ip}:{self.smtp_port}"]
            [submission]
            listen = {sub}
            [submissions]
            listen = []
            [pop3]
            listen = {pop3}
            [pop3s]
            listen = []
            [limits]
            max_connections = 30000
            max_connections_per_ip = 30000
            submission_max_messages_per_hour = 0
            [log]
            file = "{self.root / 'serpentmail.log'}"
            """) + relay)
        self.cli("domain", "add", DOMAIN)
        self.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        out = self.cli("user", "list", "--json")
        import json

        for row in json.loads(out):
            if row.get("address") == USER:
                self.user_id = int(row["id"])

    def cli(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run([sys.executable, "-m", "serpentmail", "-c", str(self.conf), *args],
                             input=stdin, text=True, capture_output=True, check=False)
        if res.returncode != 0:
            raise Unavailable(f"serpentmail {' '.join(args)} failed: {res.stderr.strip()[-300:]}")
        return res.stdout

    @property
    def maildir(self) -> Path:
        return self.data / "mail" / str(self.user_id)

    @property
    def new_dir(self) -> Path:
        return self.maildir / "new"

    def start(self, src: Path | None = None) -> None:
        """Start the server; ``src``: run the code of that checkout's ``src/`` (bench.ab)."""
        logfile = self.root / "serpentmail.log"
        offset = logfile.stat().st_size if logfile.exists() else 0  # the log is appended to
        log = open(self.root / "serve.out", "ab")
        src = src if src is not None else self.code
        env = dict(os.environ, PYTHONPATH=str(src)) if src is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "serpentmail", "-c", str(self.conf), "serve"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        try:
            wait_port(self.ip, self.smtp_port)
            if self.pop3_port:
                wait_port(self.ip, self.pop3_port, timeout=5)
            self._wait_started(offset)
        except Unavailable:
            self.stop()
            raise

    def _wait_started(self, offset: int, timeout: float = 30.0) -> None:
        """Until every server process has logged "started" (after ``offset`` in the log): with
        workers, the parent binds the ports before the workers exist, and a measurement taken
        then (memory) would count their start-up as the connections' cost."""
        logfile = self.root / "serpentmail.log"
        expect = self.processes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(logfile, "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if text.count("serpentmail.server: started") >= expect:
                time.sleep(0.3)
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise Unavailable(f"serpentmail exited with status {self.proc.returncode}")
            time.sleep(0.05)
        raise Unavailable("serpentmail did not report started in time")

    def processes(self) -> int:
        """Server processes that serve connections: ``workers`` ("auto": one per CPU)."""
        if self.workers == "auto":
            try:
                return len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                return os.cpu_count() or 1
        return int(self.workers)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def memory_kib(self) -> int:
        return tree_pss_kib(self.pid)

    def clear_mailbox(self) -> None:
        retire(self.maildir, self.root)


_MASTER_CF = """\
{ip}:{port} inet n - n - {smtpd_limit} smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# The submission service (as in Debian's master.cf, on its own port): STARTTLS before anything
# else, AUTH only after it, relaying only for authenticated clients.
_SUBMISSION_CF = """\
{ip}:{port} inet n - n - - smtpd
  -o syslog_name=postfix-bench/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_cert_file={cert}
  -o smtpd_tls_key_file={key}
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path=private/auth
  -o smtpd_client_restrictions=
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key (the kind serpentmail makes for itself)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class Postfix:
    name = "postfix"

    def __init__(self, root: Path, *, smtpd_limit: int = 100, relay: tuple[str, int] | None = None,
                 submission: bool = False) -> None:
        self.root = root / "postfix"
        self.conf = self.root / "conf"
        self.ip = POSTFIX_IP
        self.smtp_port = free_port(self.ip)
        self.submission_port = free_port(self.ip) if submission else 0
        self.smtpd_limit = smtpd_limit
        self.relay = relay
        self.started = False
        # The submission service's SASL backend: its own Dovecot, auth service only.
        self.auth: DovecotAuth | None = (
            DovecotAuth(self.root, self.root / "spool" / "private" / "auth") if submission else None)

    def setup(self) -> None:
        if which("postfix") is None:
            raise Unavailable("postfix is not installed")
        r = self.root
        for d in (self.conf, r / "spool", r / "data", r / "mail" / "bench"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(r / "data", "postfix")
        for sub in ("new", "cur", "tmp"):
            (r / "mail" / "bench" / sub).mkdir(exist_ok=True)
        for p in [r / "mail", *(r / "mail").rglob("*")]:
            os.chown(p, MAIL_UID, MAIL_GID)
        relay = f"relayhost = [{self.relay[0]}]:{self.relay[1]}\n" if self.relay else ""
        (self.conf / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {r / 'spool'}
            data_directory = {r / 'data'}
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = peer.{DOMAIN}
            mydestination =
            inet_interfaces = all
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtpd_peername_lookup = no
            alias_maps =
            alias_database =
            local_recipient_maps =
            virtual_mailbox_domains = {DOMAIN}
            virtual_mailbox_base = {r / 'mail'}
            virtual_mailbox_maps = texthash:{self.conf / 'vmailbox'}
            virtual_uid_maps = static:{MAIL_UID}
            virtual_gid_maps = static:{MAIL_GID}
            virtual_minimum_uid = 100
            smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
            maillog_file = {r / 'maillog'}
            maillog_file_prefixes = {r}
            syslog_name = postfix-bench
            biff = no
            smtputf8_enable = no
            smtp_tls_security_level = none
            smtpd_tls_security_level = none
            """) + relay)
        (self.conf / "vmailbox").write_text(f"{USER} bench/\n")
        master = _MASTER_CF.format(ip=self.ip, port=self.smtp_port, smtpd_limit=self.smtpd_limit)
        if self.submission_port:
            cert, key = self_signed(self.root / "tls", f"peer.{DOMAIN}")
            master += _SUBMISSION_CF.format(ip=self.ip, port=self.submission_port, cert=cert, key=key)
        (self.conf / "master.cf").write_text(master)
        res = run(["postfix", "-c", str(self.conf), "post-install", "create-missing"], check=False)
        if res.returncode != 0:
            raise Unavailable(f"postfix post-install failed: {(res.stderr or res.stdout).strip()[-300:]}")
        if self.auth is not None:
            self.auth.setup()

    @property
    def new_dir(self) -> Path:
        return self.root / "mail" / "bench" / "new"

    def start(self) -> None:
        if self.auth is not None:
            self.auth.start()
        res = run(["postfix", "-c", str(self.conf), "start"], check=False)
        if res.returncode != 0:
            tail = (self.root / "maillog").read_text()[-500:] if (self.root / "maillog").exists() else ""
            if self.auth is not None:
                self.auth.stop()
            raise Unavailable(f"postfix start failed: {tail or res.stderr}")
        self.started = True
        wait_port(self.ip, self.smtp_port)
        if self.submission_port:
            wait_port(self.ip, self.submission_port)

    @property
    def pid(self) -> int:
        pidfile = self.root / "spool" / "pid" / "master.pid"
        return int(pidfile.read_text().split()[0])

    def stop(self) -> None:
        if self.started:
            run(["postfix", "-c", str(self.conf), "stop"], check=False)
            self.started = False
            time.sleep(0.3)
        if self.auth is not None:
            self.auth.stop()

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def memory_kib(self) -> int:
        return tree_pss_kib(self.pid)

    def clear_mailbox(self) -> None:
        retire(self.root / "mail" / "bench", self.root, uid=MAIL_UID, gid=MAIL_GID)

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.root / "spool" / sub
            if d.exists() and any(True for _ in d.rglob("*") if _.is_file()):
                return False
        return True


class Dovecot:
    name = "dovecot"

    def __init__(self, root: Path) -> None:
        self.root = root / "dovecot"
        self.ip = DOVECOT_IP
        self.pop3_port = free_port(self.ip)
        self.proc_started = False

    def setup(self) -> None:
        if which("dovecot") is None or not Path("/usr/lib/dovecot/pop3").exists():
            raise Unavailable("dovecot-pop3d is not installed")
        r = self.root
        for d in (r / "run", r / "state", r / "mail"):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(r / "mail", MAIL_UID, MAIL_GID)
        (r / "passwd").write_text(f"{USER}:{password_entry()}:{MAIL_UID}:{MAIL_GID}::{r / 'mail' / 'u'}\n")
        self.conf = r / "dovecot.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            base_dir = {r / 'run'}
            state_dir = {r / 'state'}
            instance_name = dovecot-bench
            log_path = {r / 'dovecot.log'}
            protocols = pop3
            listen = {self.ip}
            ssl = no
            disable_plaintext_auth = no
            auth_mechanisms = plain
            first_valid_uid = 1
            mail_location = maildir:~/Maildir
            pop3_uidl_format = %f
            passdb {{
              driver = passwd-file
              args = {r / 'passwd'}
            }}
            userdb {{
              driver = passwd-file
              args = {r / 'passwd'}
            }}
            service pop3-login {{
              inet_listener pop3 {{
                address = {self.ip}
                port = {self.pop3_port}
              }}
              inet_listener pop3s {{
                port = 0
              }}
            }}
            service imap-login {{
              inet_listener imap {{
                port = 0
              }}
              inet_listener imaps {{
                port = 0
              }}
            }}
            service stats {{
              unix_listener stats-reader {{
                mode = 0600
              }}
              unix_listener stats-writer {{
                mode = 0666
              }}
            }}
            """))

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / "u" / "Maildir"

    def start(self) -> None:
        # The daemon keeps the inherited descriptors: give it a file, not our pipes.
        with open(self.root / "start.out", "wb") as out:
            rc = subprocess.run(["dovecot", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            raise Unavailable(f"dovecot failed to start: {(self.root / 'start.out').read_text().strip()[-400:]}")
        self.proc_started = True
        wait_port(self.ip, self.pop3_port)

    @property
    def pid(self) -> int:
        return int((self.root / "run" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.proc_started:
            run(["doveadm", "-c", str(self.conf), "stop"], check=False)
            self.proc_started = False
            time.sleep(0.3)

    def cpu(self) -> float:
        return tree_cpu(self.pid)


class DovecotAuth(Dovecot):
    """A private Dovecot with no mail protocols: only its auth service, as a Postfix SASL backend.

    The ``unix_listener`` is the private Postfix's ``private/auth`` (owned by ``postfix``, like a
    packaged submission setup); the passdb is a passwd-file holding the bench user, its password
    hashed as serpentmail hashes its own (:func:`password_entry`).
    """

    name = "dovecot-auth"

    def __init__(self, root: Path, socket: Path) -> None:
        self.root = root / "dovecot-auth"
        self.ip = ""
        self.pop3_port = 0
        self.socket = socket
        self.proc_started = False

    def setup(self) -> None:
        if which("dovecot") is None:
            raise Unavailable("dovecot is not installed")
        r = self.root
        for d in (r / "run", r / "state"):
            d.mkdir(parents=True, exist_ok=True)
        (r / "passwd").write_text(f"{USER}:{password_entry()}:{MAIL_UID}:{MAIL_GID}::{r}\n")
        self.conf = r / "dovecot.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            base_dir = {r / 'run'}
            state_dir = {r / 'state'}
            instance_name = dovecot-bench-auth
            log_path = {r / 'dovecot.log'}
            protocols = none
            ssl = no
            auth_mechanisms = plain login
            passdb {{
              driver = passwd-file
              args = {r / 'passwd'}
            }}
            userdb {{
              driver = passwd-file
              args = {r / 'passwd'}
            }}
            service auth {{
              unix_listener {self.socket} {{
                mode = 0660
                user = postfix
                group = postfix
              }}
            }}
            service stats {{
              unix_listener stats-reader {{
                mode = 0600
              }}
              unix_listener stats-writer {{
                mode = 0666
              }}
            }}
            """))

    def start(self) -> None:
        with open(self.root / "start.out", "wb") as out:
            rc = subprocess.run(["dovecot", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            raise Unavailable(f"dovecot (auth) failed to start: {(self.root / 'start.out').read_text().strip()[-400:]}")
        self.proc_started = True
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"dovecot (auth) made no socket {self.socket}")
            time.sleep(0.05)
