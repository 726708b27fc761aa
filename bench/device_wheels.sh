#!/usr/bin/env bash
# Wheels of what unialign needs and the GPU machine's image lacks or holds at another version
# (that machine cannot reach PyPI; its image has torch, torchvision, transformers, lightning,
# numpy, pyyaml, pillow, tqdm, pytest and pytest-timeout, which are NOT carried: a second copy
# would shadow the machine's own). timm and typing-extensions are carried at the versions CI
# uses (pydantic 2.14 needs typing-extensions >= 4.16). Run here, in the repository root; then give
# `.whl` as a carried path to the device tool (.gitignore keeps it out of git) and run
# bench/gpu_suite.sh there, which installs them (docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # an old wheel beside its new version breaks the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 timm==1.0.31 \
    webdataset==1.0.2 braceexpand==0.1.7 \
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
du -sh .whl
