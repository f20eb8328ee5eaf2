"""Build step: the hot-path modules compiled to C with mypyc, where that can be done.

Everything else about the package is in pyproject.toml; this file exists only because
setuptools takes extension modules from code, not from configuration.

mypyc (part of mypy) translates the type-annotated modules in :data:`COMPILED` to C, and the
C compiler builds each as an extension module beside its ``.py`` source, which stays in the
package: Python imports the extension first. The code is the same; it runs with fewer
interpreter steps per protocol command (measured in bench/README.md).

Beside them it builds two small hand-written C modules under the same rules:
``serpentmail._scan`` (DATA's bare CR/LF check in one memchr pass; src/serpentmail/_scan.c)
and ``serpentmail._commit`` (the delivery journal's append and the renames after it in one
call, and a spool pool's file creations in another, each without the interpreter's lock in
between; src/serpentmail/_commit.c).

Nothing depends on it. The modules run as ordinary Python when:

* ``SERPENTMAIL_PURE=1`` is set at install time;
* the install is editable (``pip install -e``): the sources run as they are edited;
* mypyc or the C compiler fails (no compiler, no Python headers, a mypyc limitation): the
  build says so in one warning and installs the pure modules. A partial build is removed, so
  an install never mixes a compiled module with a missing support library.

A dataclass in these modules keeps the methods ``@dataclass`` generates, and those stay Python
functions: the classes made per command or per message (the SMTP and POP3 events, replies,
addresses, commit jobs, journal entries) write their own ``__init__``, which mypyc compiles
(about ten times faster than the generated one; frozen ones set their fields with
``object.__setattr__``).

Modules chosen: the ones every message runs through, less queue/store.py, which the tests
subclass (a compiled class cannot be subclassed by interpreted code, nor its methods replaced
on an instance, and a compiled module calls its own functions directly). The tests of the
compiled modules use what a compiled module still looks up at run time: attributes such as
``Journal.flush_fs``, and the functions of other modules (``os.open``).
"""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/serpentmail/accounts/db.py",
    "src/serpentmail/delivery/base.py",
    "src/serpentmail/delivery/remote.py",
    "src/serpentmail/log.py",
    "src/serpentmail/proto/address.py",
    "src/serpentmail/proto/pop3.py",
    "src/serpentmail/proto/replies.py",
    "src/serpentmail/proto/smtp_client.py",
    "src/serpentmail/proto/smtp_server.py",
    "src/serpentmail/queue/scheduler.py",
    "src/serpentmail/queue/service.py",
    "src/serpentmail/server/context.py",
    "src/serpentmail/server/peers.py",
    "src/serpentmail/server/pop3.py",
    "src/serpentmail/server/session.py",
    "src/serpentmail/server/smtp.py",
    "src/serpentmail/storage/journal.py",
    "src/serpentmail/storage/mailbox.py",
    "src/serpentmail/storage/maildir.py",
]


def _pure() -> bool:
    return os.environ.get("SERPENTMAIL_PURE", "") not in ("", "0")


# PEP 660: setuptools' build_editable runs this file with the editable_wheel command. (The
# build_ext flag editable_mode alone comes too late: the command may be finalized before.)
_EDITABLE = "editable_wheel" in sys.argv
_BUILDING = {"bdist_wheel", "build", "build_ext", "install", "bdist_egg"}


class _Distribution(Distribution):
    def has_ext_modules(self) -> bool:  # a platform wheel, since it may hold extensions
        return not _pure()


class _MypycBuildExt(build_ext):
    def finalize_options(self) -> None:
        editable = _EDITABLE or getattr(self, "editable_mode", False)
        # egg_info and dist_info (pip's metadata steps) finalize this command too, only to list
        # sources: run mypyc for a command that builds, not for those.
        building = bool(set(self.distribution.commands) & _BUILDING)
        if not self.distribution.ext_modules and building and not _pure() and not editable:
            self.distribution.ext_modules = [*_mypycify(), *_c_extensions()]
        super().finalize_options()

    def run(self) -> None:
        # pip builds in the source tree, whose build/ keeps what earlier builds made, and all of
        # build/lib goes into the wheel: extensions of an earlier build (another module set, or
        # compiled where this one is pure) would be installed over this build's sources.
        lib = Path(self.build_lib)
        for stale in [*lib.glob("*__mypyc*.so"), *lib.glob("serpentmail/**/*.so")]:
            stale.unlink()
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: install the pure modules
            _warn_pure(f"the C build failed ({exc})")
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            self.distribution.ext_modules = []

    def build_extension(self, ext: Any) -> None:
        # mypyc writes the support library as several C files (multi_file): compile them on
        # every CPU at once (distutils compiles one extension's files one after the other).
        # The serial way stays in place if this setuptools' compiler is not the usual one.
        compiler = self.compiler
        serial = compiler.compile
        if all(hasattr(compiler, a) for a in ("_setup_compile", "_get_cc_args", "_compile")):
            compiler.compile = functools.partial(_parallel_compile, compiler)
        try:
            super().build_extension(ext)
        finally:
            compiler.compile = serial


def _warn_pure(why: str) -> None:
    print(f"warning: serpentmail: {why}; installing the pure-Python modules (they work the same, slower)",
          file=sys.stderr)


def _parallel_compile(compiler: Any, sources: list[str], output_dir: str | None = None, macros: Any = None,
                      include_dirs: Any = None, debug: bool = False, extra_preargs: Any = None,
                      extra_postargs: Any = None, depends: Any = None) -> list[str]:
    """distutils' CCompiler.compile, with the files compiled by a pool of threads (each one
    waits on its own compiler process)."""
    macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj: str) -> None:
        src, ext = build[obj]
        compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, [o for o in objects if o in build]))
    return list(objects)


def _c_extensions() -> list[Any]:
    """The hand-written C modules, built with the mypyc modules and, like them, optional:
    serpentmail._scan, DATA's bare CR/LF check (src/serpentmail/_scan.c; proto/smtp_server.py
    falls back to Python), and serpentmail._commit, the journal's append and the renames after
    it in one call and a spool pool's refill in another (src/serpentmail/_commit.c;
    storage/journal.py and storage/maildir.py fall back to Python)."""
    from setuptools import Extension

    return [Extension("serpentmail._scan", ["src/serpentmail/_scan.c"]),
            Extension("serpentmail._commit", ["src/serpentmail/_commit.c"])]


def _mypycify() -> list[Any]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn_pure("mypyc is not available")
        return []
    try:
        # Its own mypy options, not pyproject's strict ones: mypyc needs the types, and the build
        # environment lacks the third-party packages (their names are then Any).
        return list(mypycify(["--config-file", os.devnull, "--ignore-missing-imports", *COMPILED], opt_level="3", multi_file=True))
    except (Exception, SystemExit) as exc:
        _warn_pure(f"mypyc could not compile the modules ({exc!r})")
        return []


setup(distclass=_Distribution, cmdclass={"build_ext": _MypycBuildExt})
