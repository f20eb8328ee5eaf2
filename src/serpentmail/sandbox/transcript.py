"""SMTP and POP3 clients that record their exchange, for the demo's narration.

They are the stdlib clients with two hooks overridden: every command line sent and every reply
received is appended to ``transcript`` as ``("C", line)`` / ``("S", line)``. Credentials are
masked; message bodies are summarised by size.
"""

from __future__ import annotations

import poplib
import smtplib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer

Transcript = list[tuple[str, str]]


class TracingSMTP(smtplib.SMTP):
    def __init__(self, *args: Any, transcript: Transcript, **kwargs: Any) -> None:
        self.transcript = transcript
        self._auth_pending = False
        super().__init__(*args, **kwargs)

    def send(self, s: Buffer | str) -> None:
        raw = s.encode("utf-8", "replace") if isinstance(s, str) else bytes(s)
        if raw.endswith(b"\r\n.\r\n") and raw.count(b"\r\n") > 2:
            self.transcript.append(("C", f"<message, {len(raw)} octets, ending with CRLF.CRLF>"))
        else:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.upper().startswith("AUTH ") or self._auth_pending:
                shown = " ".join(line.split()[:2]) + " <credentials hidden>" if line.upper().startswith("AUTH") else "<credentials hidden>"
                self.transcript.append(("C", shown))
            else:
                self.transcript.append(("C", line))
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, msg = super().getreply()
        lines = msg.decode("utf-8", "replace").split("\n") if msg else [""]
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.transcript.append(("S", f"{code}{sep}{line}"))
        self._auth_pending = code == 334
        return code, msg


class TracingPOP3(poplib.POP3):
    def __init__(self, *args: Any, transcript: Transcript, **kwargs: Any) -> None:
        self.transcript = transcript
        super().__init__(*args, **kwargs)

    def _putcmd(self, line: str) -> None:
        shown = "PASS <hidden>" if line.upper().startswith("PASS ") else line
        self.transcript.append(("C", shown))
        super()._putcmd(line)  # type: ignore[misc]

    def _getresp(self) -> bytes:
        resp: bytes = super()._getresp()  # type: ignore[misc]
        self.transcript.append(("S", resp.decode("utf-8", "replace")))
        return resp

    def _getlongresp(self) -> tuple[bytes, list[bytes], int]:
        resp, lines, octets = super()._getlongresp()  # type: ignore[misc]
        if len(lines) > 6:
            shown = [ln.decode("utf-8", "replace") for ln in lines[:4]] + [f"... ({len(lines)} lines, {octets} octets)", "."]
        else:
            shown = [ln.decode("utf-8", "replace") for ln in lines] + ["."]
        for ln in shown:
            self.transcript.append(("S", ln))
        return resp, lines, octets
