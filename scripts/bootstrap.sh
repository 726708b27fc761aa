#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with PyTorch, unialign and what the chosen
# profile needs.  Usage: bash scripts/bootstrap.sh [demo|test]   (default: demo)
set -euo pipefail
profile="${1:-demo}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null

# torch + torchvision as a matching pair (PyPI's torchvision needs the torch it was built for).
case "$(uname -m)" in
  aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
  *)             torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
esac
$pip install -q $torch_pins

case "$profile" in
  demo) $pip install -q -e ".[demo]" ;;
  test) $pip install -q -e ".[test,demo]" ;;
  *) echo "unknown profile '$profile' (demo|test)" >&2; exit 2 ;;
esac
echo "bootstrap ($profile) done: $(.venv/bin/python -c 'import torch, unialign; print("torch", torch.__version__, "unialign", unialign.__version__)')"
