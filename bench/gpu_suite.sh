#!/usr/bin/env bash
# Issue 5's measurements on a GPU machine, in parts that each fit one 10-minute device call and
# bring back at most 8 files (a JSON, written after every measurement, and a log per benchmark):
#
#   bash bench/gpu_suite.sh first     # CUDA tests (nvJPEG stream safety, speed features), then
#                                     # bench/train_step.py: every variant at 64 tokens, the 32-token rerun
#   bash bench/gpu_suite.sh compile   # torch.compile twins of the unialign variants
#   bash bench/gpu_suite.sh io        # COCO-5K-sized eval + input pipeline (CPU workers, nvJPEG)
#   bash bench/gpu_suite.sh train     # `unialign train`, DDP then FSDP, killed once and resumed
#   bash bench/gpu_suite.sh profile   # torch.profiler operator tables: online step, CLIP baseline
#   bash bench/gpu_suite.sh rerank    # ALBEF's options: COCO-5K re-ranking (K = 128) and training FLOPs
#   bash bench/gpu_suite.sh stash     # keep the asset bundle's part this call carried (.assets/pI)
#   bash bench/gpu_suite.sh demo224   # the CLS-only shared block's speed, then bench/reproduce.py: the
#                                     # demo's recipe at 224 px on the stashed bundle (PERFORMANCE.md)
#
# Arguments after the part go to every benchmark it runs, not to pytest (`bash bench/gpu_suite.sh
# io --small` checks the plumbing on any machine). Results go to $OUT (the device tool's folder)
# or bench_out/; `python bench/perf_table.py bench_out/*.json` makes the Markdown tables. Wheels in
# .whl (made by bench/device_wheels.sh) are installed first where unialign's needs are missing;
# unialign itself runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?"which part: first, compile, io, train, profile, rerank, stash or demo224"}
shift
extra=("$@")
out=${OUT:-bench_out}
mkdir -p "$out"
if [ "$part" = stash ]; then  # plain copying: needs none of unialign's packages
    exec python3 bench/device_assets.py stash .assets /tmp/ua_stash
fi
if ! python3 -c "import pydantic, webdataset" 2>/dev/null; then
    if [ ! -d .whl ]; then
        echo "pydantic/webdataset are missing here and no .whl folder was carried: run" \
             "'bash bench/device_wheels.sh' on the dev machine and pass carry: [\".whl\"]" >&2
        exit 3
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=${UNIALIGN_BENCH_WORKDIR:-/tmp/ua_bench}
header() {  # the first line of every log: what ran where
    python3 - <<'PY'
import importlib.metadata as md, shutil, torch
names = ["torch", "torchvision", "timm", "transformers", "lightning", "numpy", "pydantic", "webdataset"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} missing")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
disk = ", ".join(f"{p} {shutil.disk_usage(p).free / 2**30:.1f} GiB free" for p in ("/dev/shm", "/tmp"))
print(f"# {gpu} | {' | '.join(vers)} | {disk}")
PY
}

run() {  # run NAME SCRIPT ARGS...: JSON (rewritten as each figure is measured) + log
    local name=$1 script=$2
    shift 2
    { header; echo "== $name: python3 bench/$script $* ${extra[*]}"; } | tee "$out/$name.log"
    python3 "bench/$script" "$@" "${extra[@]}" --json "$out/$name.json" 2>&1 | tee -a "$out/$name.log"
}

case $part in
    first)
        { header; python3 -m pytest -q -p no:cacheprovider tests/test_device_decode.py tests/test_teacher_cache.py tests/test_step_speed.py; } \
            2>&1 | tee "$out/tests.log"
        run train_step train_step.py --workdir "$work"
        run train_step_len32 train_step.py --workdir "$work" --text-len 32 \
            --variants unialign-bf16-online,unialign-bf16-cached,clip-vit-b16-bert-base ;;
    compile)
        run train_step_compile train_step.py --workdir "$work" --compile \
            --variants unialign-bf16-online,unialign-bf16-cached ;;
    io)
        run eval eval.py --workdir /tmp/ua_eval
        run data data.py --workdir /tmp/ua_data ;;
    train) run train_run train_run.py --workdir /tmp/ua_run ;;
    profile)  # where the step's time goes: torch.profiler tables of the online step and the CLIP baseline
        run train_step_profile train_step.py --workdir "$work" --steps 5 --warmup 3 --profile "$out/profile" \
            --variants unialign-bf16-online,clip-vit-b16-bert-base ;;
    rerank) run rerank rerank.py --workdir /tmp/ua_eval ;;
    demo224)  # arguments go to bench/reproduce.py; results.json is copied back as each run lands
        python3 bench/device_assets.py stash .assets /tmp/ua_stash || exit 1
        python3 bench/device_assets.py unpack /tmp/ua_stash /tmp/ua || exit 1
        { header; python3 bench/shared_block.py --json "$out/shared_block.json"; } 2>&1 | tee "$out/shared_block.log"
        (while sleep 10; do cp /tmp/ua_repro/results.json "$out/" 2>/dev/null; done) &
        copier=$!
        { header; python3 bench/reproduce.py --scale demo --image-size 224 --assets /tmp/ua/bundle \
            --output /tmp/ua_repro --report /tmp/ua_repro/report/REPRODUCTION.md "${extra[@]}"; } 2>&1 \
            | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^\s*$' | tee "$out/reproduce.log"
        kill $copier
        cp /tmp/ua_repro/results.json "$out/" ;;
    *) echo "unknown part $part (first, compile, io, train, profile, rerank, stash, demo224)" >&2; exit 2 ;;
esac
