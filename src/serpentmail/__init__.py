"""serpentmail: a complete, self-hostable mail system (MX, submission, queue, Maildir, POP3)."""

__version__ = "0.1.0"
