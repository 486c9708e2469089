#!/usr/bin/env bash
# Install what tests/infer/test_demo_browser.py needs, and nothing that is already there:
#   - Debian's chromium (/usr/bin/chromium), with apt-get; Playwright drives it, it downloads no browser
#   - Playwright for Python, into the virtual environment VENV
#
#   scripts/install_browser.sh [VENV]          # VENV defaults to .venv; run as root or with sudo available
set -euo pipefail

VENV="${1:-.venv}"
PLAYWRIGHT_VERSION="1.65.2"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "install_browser.sh: no Python at $PY (pass the virtual environment as the first argument)" >&2
    exit 2
fi

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    # try the package lists already on the machine first; refresh them only if that fails
    $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }
fi

installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true)"
if [ "$installed" != "$PLAYWRIGHT_VERSION" ]; then
    "$PY" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"
echo "playwright: $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
