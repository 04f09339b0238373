#!/usr/bin/env bash
# Install everything into ./.venv and run the main job: train MoLE-Flow on MVTec AD "bottle"
# and print its test metrics. MVTEC_ROOT points at the folder holding the category folders.
#   bash scripts/run_main.sh [more anomalib train arguments]
set -euo pipefail
EXTRAS="export"
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
.venv/bin/anomalib train --model MoLEFlow --config configs/moleflow.yaml \
    --data.root "${MVTEC_ROOT:-../shared/data/mvtec_ad}" --data.category bottle "$@"
