# Type information for the optional C module built from _commit.c (setup.py). Linux only.

def write_then(fd: int, buffer: object, length: int, offset: int, flags: int,
               ops: list[tuple[int, int, int | bytes, bytes]], jobs: int, /) -> tuple[int, list[int]]: ...
