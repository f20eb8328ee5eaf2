"""serpentmail: a complete, self-hostable mail system (MX, submission, queue, Maildir, POP3)."""

from __future__ import annotations

__version__ = "0.1.0"

# The modules setup.py compiles with mypyc (its COMPILED; a test checks they agree).
COMPILED_MODULES = (
    "accounts.db",
    "delivery.base",
    "delivery.remote",
    "log",
    "proto.address",
    "proto.pop3",
    "proto.replies",
    "proto.smtp_client",
    "proto.smtp_server",
    "queue.scheduler",
    "queue.service",
    "server.context",
    "server.peers",
    "server.pop3",
    "server.session",
    "server.smtp",
    "storage.journal",
    "storage.mailbox",
    "storage.maildir",
)


def compiled_modules() -> list[str]:
    """The modules this installation runs compiled (built by setup.py with mypyc), by name;
    empty when they run as plain Python (an editable install, no C compiler, SERPENTMAIL_PURE)."""
    import importlib
    from importlib.machinery import EXTENSION_SUFFIXES

    out = []
    for name in COMPILED_MODULES:
        path = getattr(importlib.import_module(f"{__name__}.{name}"), "__file__", None) or ""
        if path.endswith(tuple(EXTENSION_SUFFIXES)):
            out.append(name)
    return out
