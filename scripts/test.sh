#!/usr/bin/env bash
# Install everything into ./.venv and run the test suite: bash scripts/test.sh [pytest args]
# pytest's exit code is passed through (5 = no test collected counts as a failure).
set -euo pipefail
EXTRAS="test,export"
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
if [ "$#" -eq 0 ]; then set -- tests; fi
.venv/bin/python -m pytest -q "$@"
