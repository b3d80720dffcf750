#!/usr/bin/env bash
# Runs the quick test loop (pytest -m "not slow") against the LOWER bounds of the version
# windows declared in pyproject.toml, in a scratch virtual environment outside the repository.
#
#   tools/test_lower_bounds.sh                 # venv in /tmp/accel-trainer-lower-bounds
#   LOWER_VENV=/some/dir tools/test_lower_bounds.sh
#   REUSE_VENV=1 tools/test_lower_bounds.sh    # keep an existing venv, only re-pin and re-test
#
# The pins below must equal the ">=" bounds in pyproject.toml's dependencies (the script checks).
# torch is installed FIRST and alone: `pip install torch==X` takes the CPU build where one is
# on disk (/opt/wheels here); letting pip resolve torch as a dependency could pull a multi-GB
# CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ACCELERATE_VERSION=${ACCELERATE_VERSION:-1.8.0}
JSONARGPARSE_VERSION=${JSONARGPARSE_VERSION:-4.49.0}
TORCHMETRICS_VERSION=${TORCHMETRICS_VERSION:-1.0.0}
VENV=${LOWER_VENV:-/tmp/accel-trainer-lower-bounds}
PYTHON=${PYTHON:-python3}

case "$VENV" in
    "$REPO"|"$REPO"/*) echo "LOWER_VENV must be outside the repository ($REPO)" >&2; exit 2 ;;
esac

# The pins are the declared lower bounds: fail loudly when pyproject.toml says otherwise.
for pin in "torch>=${TORCH_VERSION%.*}" "accelerate>=${ACCELERATE_VERSION%.0}" \
           "jsonargparse[signatures]>=${JSONARGPARSE_VERSION%.0}" "torchmetrics>=${TORCHMETRICS_VERSION%.0}"; do
    if ! grep -qF "\"$pin" pyproject.toml; then
        echo "pyproject.toml does not declare the lower bound $pin (update this script or pyproject.toml)" >&2
        exit 2
    fi
done

if [ "${REUSE_VENV:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
fi
# The project (editable: its `accel-trainer` script runs this checkout) with the three
# pure-Python dependencies pinned to their lower bounds; torch stays as installed.
"$VENV/bin/python" -m pip install --quiet -e "$REPO[dev]" \
    "torch==$TORCH_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "jsonargparse[signatures]==$JSONARGPARSE_VERSION" \
    "torchmetrics==$TORCHMETRICS_VERSION"

echo "== versions under test"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "accelerate", "jsonargparse", "torchmetrics", "numpy", "wandb"):
    print(f"{name}=={md.version(name)}")
PY

export PYTHONPATH=$REPO WANDB_MODE=offline PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
