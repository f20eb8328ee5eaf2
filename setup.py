"""Build step: the hot-path modules compiled to C with mypyc, where that can be done.

Everything else about the package is in pyproject.toml; this file exists only because
setuptools takes extension modules from code, not from configuration.

mypyc (part of mypy) translates the type-annotated modules in :data:`COMPILED` to C, and the
C compiler builds each as an extension module beside its ``.py`` source, which stays in the
package: Python imports the extension first. The code is the same; it runs with fewer
interpreter steps per protocol command (measured in bench/README.md).

Nothing depends on it. The modules run as ordinary Python when:

* ``SERPENTMAIL_PURE=1`` is set at install time;
* the install is editable (``pip install -e``): the sources run as they are edited;
* mypyc or the C compiler fails (no compiler, no Python headers, a mypyc limitation): the
  build says so in one warning and installs the pure modules. A partial build is removed, so
  an install never mixes a compiled module with a missing support library.

Modules chosen: the ones every message runs through, which mypyc compiles as they are and
which no test replaces parts of at run time (a compiled module calls its own functions
directly, so monkeypatching them would not take). delivery/remote.py is left out: mypyc does
not compile async generators.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/serpentmail/log.py",
    "src/serpentmail/proto/address.py",
    "src/serpentmail/proto/pop3.py",
    "src/serpentmail/proto/replies.py",
    "src/serpentmail/proto/smtp_client.py",
    "src/serpentmail/proto/smtp_server.py",
    "src/serpentmail/queue/scheduler.py",
    "src/serpentmail/server/pop3.py",
    "src/serpentmail/server/session.py",
    "src/serpentmail/server/smtp.py",
]


def _pure() -> bool:
    return os.environ.get("SERPENTMAIL_PURE", "") not in ("", "0")


# PEP 660: setuptools' build_editable runs this file with the editable_wheel command. (The
# build_ext flag editable_mode alone comes too late: the command may be finalized before.)
_EDITABLE = "editable_wheel" in sys.argv


class _Distribution(Distribution):
    def has_ext_modules(self) -> bool:  # a platform wheel, since it may hold extensions
        return not _pure()


class _MypycBuildExt(build_ext):
    def finalize_options(self) -> None:
        editable = _EDITABLE or getattr(self, "editable_mode", False)
        if not self.distribution.ext_modules and not _pure() and not editable:
            self.distribution.ext_modules = _mypycify()
        super().finalize_options()

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: install the pure modules
            self._fallback(f"the C build failed ({exc})")
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            self.distribution.ext_modules = []

    def _fallback(self, why: str) -> None:
        self.warn(f"serpentmail: {why}; installing the pure-Python modules (they work the same, slower)")


def _mypycify() -> list[Any]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("warning: serpentmail: mypyc is not available; installing the pure-Python modules")
        return []
    try:
        # Its own mypy options, not pyproject's strict ones: mypyc needs the types, and the build
        # environment lacks the third-party packages (their names are then Any).
        return list(mypycify(["--config-file", os.devnull, "--ignore-missing-imports", *COMPILED], opt_level="3"))
    except (Exception, SystemExit) as exc:
        print(f"warning: serpentmail: mypyc could not compile the modules ({exc!r}); "
              "installing the pure-Python modules")
        return []


setup(distclass=_Distribution, cmdclass={"build_ext": _MypycBuildExt})
