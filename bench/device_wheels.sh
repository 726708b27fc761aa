#!/usr/bin/env bash
# Wheels of what unialign needs and the GPU machine's image lacks (that machine cannot reach
# PyPI; its image already has torch, torchvision, timm, transformers, lightning, numpy, pyyaml,
# pillow, tqdm; pytest is for `gpu_suite.sh tests`). Run here, in the repository root; then give
# `.whl` as a carried path to the device tool (.gitignore keeps it out of git) and run
# bench/gpu_suite.sh there, which installs them (docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    webdataset==1.0.2 braceexpand==0.1.7 \
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
du -sh .whl
