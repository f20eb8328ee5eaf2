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
"$PY" -m ruff check src tests
echo "== mypy"
"$PY" -m mypy
echo "== pytest"
exec "$PY" -m pytest -q "$@"
