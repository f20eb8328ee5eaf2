#!/bin/sh
# Install everything the tests need, then run ruff, mypy and the whole test suite.
# Works on a machine with only Python 3.11, pip and apt. Extra pytest arguments pass through.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Real mail clients from Debian for the end-to-end tests (skipped with a message if apt
# cannot install them, e.g. without root).
need=""
for pair in swaks:swaks msmtp:msmtp fetchmail:fetchmail mpop:mpop getmail:getmail6; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need="$need ${pair#*:}"   # command:package
done
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing from Debian:$need"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need) >/dev/null 2>&1 \
            || echo "warning: could not install$need; the tests that need them will be skipped"
    else
        echo "warning: not root or no apt-get; tests needing$need will be skipped"
    fi
fi

"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "== ruff"
"$PY" -m ruff check src tests setup.py
echo "== mypy"
"$PY" -m mypy

# The package as `pip install .` builds it: the modules of setup.py compiled with mypyc where
# a C compiler is at hand. The whole suite runs against that build (PYTHONPATH comes before
# the editable install, and reaches the servers the tests start); without extra arguments the
# unit tests run once more against the sources as they are, the pure-Python modules.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
echo "== build (pip install --target, compiled with mypyc where possible: a minute or two)"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$build" .
if ls "$build"/*__mypyc*.so >/dev/null 2>&1; then
    if [ $# -eq 0 ]; then
        echo "== pytest: unit tests, pure-Python modules"
        "$PY" -m pytest -q -p no:cacheprovider tests/unit
    fi
    echo "== pytest: compiled modules"
    SERPENTMAIL_EXPECT_COMPILED=1 PYTHONPATH="$build" "$PY" -m pytest -q "$@"
else
    echo "== pytest: pure-Python modules (the build compiled nothing)"
    "$PY" -m pytest -q "$@"
fi
