#!/usr/bin/env bash
# Create .venv in the project root and install dilo into it.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus pytest, hypothesis, ruff
#
# torch: on a machine with an NVIDIA GPU (nvidia-smi works) pip installs the default CUDA build of
# torch>=2.4. Without a GPU it asks for torch==2.13.0, for which pip prefers a local CPU wheel
# (2.13.0+cpu) when one is on its find-links path; elsewhere set DILO_TORCH_SPEC and, for the
# CPU-only wheels, PIP_EXTRA_INDEX_URL to PyTorch's CPU index. An already installed torch that
# satisfies torch>=2.4 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null; then
  if [ -n "${DILO_TORCH_SPEC:-}" ]; then
    spec=$DILO_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.4"
  else
    spec="torch==2.13.0"
  fi
  echo "setup: installing $spec" >&2
  "${pip[@]}" "$spec"
fi
"${pip[@]}" -e ".$extras"
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
