#!/usr/bin/env bash
# The whole GPU speed measurement in one run, offline: full-size SD1.5 architecture (random weights) at 512 px,
# bf16, batch 1/4/8, tistudio against diffusers' textual-inversion example, plus generation. Results go to
# ${OUT:-.}/speed-gpu.json and the printed table. COMPILE=1 adds a run of tistudio alone with its UNet compiled
# (--compile-unet, batch 8; a few more minutes) to speed-gpu-compiled.json. SDXL=1 adds tistudio alone on SDXL's
# full architecture (random weights, ~14 GB built once) at 1024 px, bf16, batch 1, with and without gradient
# checkpointing, to speed-gpu-sdxl*.json (the CUDA peak column is what a 12 GB card must hold). With more than one
# GPU it also measures data-parallel scaling (torchrun, one process per GPU, NCCL): samples/s at 1, 2 and all GPUs,
# SD1.5 at 512 px batch 4 per GPU to speed-gpu-scaling.json and (SDXL=1) SDXL at 1024 px batch 1 per GPU to
# speed-gpu-sdxl-scaling.json; the "scaling" figure is samples/s at N / (N x one GPU's), target >= 0.9.
#
#   bench/gpu.sh PEER_SCRIPT [WHEELS_DIR]
#
# PEER_SCRIPT: diffusers' examples/textual_inversion/textual_inversion.py (supplied by you, never committed).
# WHEELS_DIR: a folder of wheels for what the GPU machine lacks (typically diffusers and its small
# dependencies), made beforehand on a connected machine with
#   pip download diffusers==0.42.1 -d WHEELS_DIR --only-binary=:all: --no-deps
# Nothing is fetched from the network.
set -euo pipefail
peer=${1:?usage: bench/gpu.sh PEER_SCRIPT [WHEELS_DIR]}
wheels=${2:-wheels}
out=${OUT:-.}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
for module in diffusers transformers accelerate safetensors; do
    if ! "$python" -c "import $module" 2>/dev/null; then
        "$python" -m pip install --no-index --find-links "$wheels" "$module"
    fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sd15 --size 512 \
    --batch 1,4,8 --device cuda --precision bf16 --steps 10 --warmup 3 --peer "$peer" --generate \
    --gen-steps 20 --gen-images 4 --json "$out/speed-gpu.json"
if [ "${COMPILE:-0}" = 1 ]; then
    TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sd15 --size 512 \
        --batch 8 --device cuda --precision bf16 --steps 10 --warmup 5 --compile --json "$out/speed-gpu-compiled.json"
fi
if [ "${SDXL:-0}" = 1 ]; then
    TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sdxl --size 1024 \
        --batch 1 --device cuda --precision bf16 --steps 10 --warmup 3 --checkpointing \
        --json "$out/speed-gpu-sdxl-checkpointing.json"
    TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sdxl --size 1024 \
        --batch 1 --device cuda --precision bf16 --steps 10 --warmup 3 --json "$out/speed-gpu-sdxl.json"
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -gt 1 ]; then
    counts=1,2
    if [ "$gpus" -gt 2 ]; then counts="1,2,$gpus"; fi
    TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sd15 --size 512 \
        --batch 4 --device cuda --precision bf16 --steps 10 --warmup 3 --processes "$counts" \
        --json "$out/speed-gpu-scaling.json"
    if [ "${SDXL:-0}" = 1 ]; then
        TISTUDIO_CACHE=${TISTUDIO_CACHE:-/tmp/tistudio-cache} "$python" bench/speed.py --model sdxl --size 1024 \
            --batch 1 --device cuda --precision bf16 --steps 10 --warmup 3 --processes "$counts" \
            --json "$out/speed-gpu-sdxl-scaling.json"
    fi
fi
