#!/usr/bin/env bash
# Install everything into ./.venv and run the main job: continual MoLE-Flow over the real
# MVTec AD stream bottle -> transistor (task id hidden at test time), printing the final
# per-task metrics. MVTEC_ROOT points at the folder holding the category folders.
#   bash scripts/run_main.sh [more `anomalib-moleflow continual` arguments]
set -euo pipefail
EXTRAS="export"
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
.venv/bin/anomalib-moleflow continual --config mvtec_real \
    --data.root "${MVTEC_ROOT:-../shared/data/mvtec_ad}" \
    --run.output_dir "results/continual/mvtec_real_$(date +%Y%m%d_%H%M%S)" "$@"
