#!/usr/bin/env bash
# Issue 5's measurements on a GPU machine, in parts that each fit one 10-minute device call:
#
#   bash bench/gpu_suite.sh step      # bench/train_step.py, every variant, batch 256, text 64
#   bash bench/gpu_suite.sh compile   # torch.compile twins + the text-32 rerun
#   bash bench/gpu_suite.sh data      # input pipeline: CPU workers, data.decode: device (nvJPEG)
#   bash bench/gpu_suite.sh eval      # COCO-5K-sized encode + rank, fp32 and bf16
#   bash bench/gpu_suite.sh tests     # the tests that need CUDA (nvJPEG stream safety), then the speed tests
#
# Arguments after the part go to every benchmark it runs (`bash bench/gpu_suite.sh data --small`
# checks the plumbing on any machine). Each part writes PART.json and PART.log into $OUT (the device tool's output folder) or
# bench_out/, and a Markdown table (bench/perf_table.py) into PART.md. Wheels in .whl (made by
# bench/device_wheels.sh) are installed first where unialign's needs are missing; unialign itself
# runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?"which part: step, compile, data, eval or tests"}
shift
extra=("$@")
out=${OUT:-bench_out}
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import pydantic, webdataset, pytest" 2>/dev/null; then  # only where they are missing
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=${UNIALIGN_BENCH_WORKDIR:-/tmp/ua_bench}

run() {  # run NAME SCRIPT ARGS...: JSON + log + table for one benchmark invocation
    local name=$1 script=$2
    shift 2
    echo "== $name: python3 bench/$script $*"
    python3 "bench/$script" "$@" "${extra[@]}" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
    [ -f "$out/$name.json" ] && python3 bench/perf_table.py "$out/$name.json" > "$out/$name.md"
}

case $part in
    step) run train_step train_step.py --workdir "$work" ;;
    compile)
        run train_step_compile train_step.py --workdir "$work" --compile \
            --variants unialign-bf16-online,unialign-bf16-cached
        run train_step_len32 train_step.py --workdir "$work" --text-len 32 \
            --variants unialign-bf16-online,unialign-bf16-cached,clip-vit-b16-bert-base ;;
    data) run data data.py --workdir /tmp/ua_data ;;
    eval) run eval eval.py --workdir /tmp/ua_eval ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/test_device_decode.py tests/test_speed_features.py \
            "${extra[@]}" 2>&1 | tee "$out/tests.log" ;;
    *) echo "unknown part $part (step, compile, data, eval, tests)" >&2; exit 2 ;;
esac
