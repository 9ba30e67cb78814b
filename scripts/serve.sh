#!/usr/bin/env bash
# The README's run command: set-up, then the whole service (embedded Redis, gateway, workers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/adapterd-server serve "$@"
