"""A scripted fake SMTP server for courier tests (asyncio, loopback only).

It records every command line and every message it receives, and answers from a script:
the greeting, the EHLO extensions (or an EHLO refusal), per-recipient replies, the reply to
MAIL and to the end of data, AUTH, or silence (to test timeouts). Raw DATA is kept exactly as
received (still dot-stuffed) so tests can check the client's framing byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field


@dataclass
class FakeSMTP:
    host: str
    port: int
    greeting: str = "220 fake.test ESMTP"
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES")
    ehlo_reply: str | None = None  # e.g. "502 5.5.1 no EHLO here": forces the HELO fallback
    mail_reply: str = "250 2.1.0 Sender OK"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # default 250
    data_reply: str = "250 2.0.0 queued as FAKE"
    silent: bool = False  # accept the connection, never say anything
    auth: dict[str, str] | None = None  # username -> password; AUTH offered when set
    auth_mechanisms: str = "PLAIN LOGIN"
    commands: list[str] = field(default_factory=list)
    raw_data: list[bytes] = field(default_factory=list)  # DATA payloads, as sent (stuffed)
    chunks: list[bytes] = field(default_factory=list)  # BDAT payloads
    auth_seen: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    # Answer the end of data only once this many connections have been opened (a test that
    # needs deliveries to overlap, whatever the scheduling).
    hold_data_until_connections: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> FakeSMTP:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FakeSMTP:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1

        def say(*lines: str) -> None:
            writer.write("".join(line + "\r\n" for line in lines).encode())

        try:
            if self.silent:
                await reader.read()
                return
            say(self.greeting)
            if not self.greeting.startswith("220"):
                await writer.drain()
                return
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode().rstrip("\r\n")
                self.commands.append(line)
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    if self.ehlo_reply:
                        say(self.ehlo_reply)
                    else:
                        ext = list(self.extensions) + ([f"AUTH {self.auth_mechanisms}"] if self.auth is not None else [])
                        lines = ["fake.test hello", *ext]
                        say(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
                elif verb == "HELO":
                    say("250 fake.test")
                elif verb == "MAIL":
                    say(self.mail_reply)
                elif verb == "RCPT":
                    addr = arg.partition("<")[2].partition(">")[0]
                    say(self.rcpt_replies.get(addr, "250 2.1.5 OK"))
                elif verb == "DATA":
                    say("354 go ahead")
                    await writer.drain()
                    self.raw_data.append(await reader.readuntil(b"\r\n.\r\n"))
                    while self.connections < self.hold_data_until_connections:
                        await asyncio.sleep(0.01)
                    say(self.data_reply)
                elif verb == "BDAT":
                    parts = arg.split()
                    self.chunks.append(await reader.readexactly(int(parts[0])))
                    say(self.data_reply if len(parts) > 1 else "250 2.0.0 chunk OK")
                elif verb == "AUTH" and self.auth is not None:
                    mech, _, initial = arg.partition(" ")
                    if mech.upper() == "PLAIN":
                        _, user, pw = base64.b64decode(initial).decode().split("\x00")
                    else:
                        say("334 VXNlcm5hbWU6")
                        await writer.drain()
                        user = base64.b64decode((await reader.readline()).strip()).decode()
                        say("334 UGFzc3dvcmQ6")
                        await writer.drain()
                        pw = base64.b64decode((await reader.readline()).strip()).decode()
                    self.auth_seen.append((mech.upper(), user))
                    ok = self.auth.get(user) == pw
                    say("235 2.7.0 OK" if ok else "535 5.7.8 bad credentials")
                elif verb == "RSET" or verb == "NOOP":
                    say("250 2.0.0 OK")
                elif verb == "QUIT":
                    say("221 2.0.0 bye")
                    await writer.drain()
                    return
                else:
                    say("502 5.5.1 not implemented")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
