#!/usr/bin/env bash
# The GPU paths on one H100 / H200 in under 8 minutes (from the repository root, with medfm installed):
#   bash bench/gpu_check.sh            # results also in bench/results/gpu_*.json
# 1. bf16 training throughput, peak memory and model FLOP utilisation (FLOPs counted by torch per step, against
#    989 dense bf16 TFLOP/s) of MAE ViT-B/16, DINO ViT-S/16 and DINOv2 ViT-S/14 at 224 px (DINO / DINOv2 with
#    their multi-crop), through medfm's engine and through a bare PyTorch loop on the same batch, with the host
#    syncs per step of each counted;
# 2. the data path: images/s per CPU core of DINO's multi-crop views decoded from shards.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: bench/gpu_check.sh measures the GPU paths"
print("torch", torch.__version__, "device", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
PY
echo "== engine vs bare loop, bf16, 224 px =="
timeout 360 python bench/bench_pretrain.py --precision bf16 --batch 64 --steps 20 --repeats 2 --log-every 20 \
    --flops --count-syncs --peak-tflops "${PEAK_TFLOPS:-989}" \
    --recipe mae=mae_vit_b16_224.yaml dino=dino_vit_s16_224.yaml dinov2=dinov2_vit_s14_224.yaml \
    --json "$OUT/gpu_pretrain.json"
echo "== data path: DINO multi-crop from shards, per core =="
timeout 90 python bench/bench_data.py --multicrop dino_vit_s16_224.yaml --samples 400 --json "$OUT/gpu_data_path.json"
