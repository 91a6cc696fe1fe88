#!/usr/bin/env bash
# The GPU paths on one H100 / H200 in under 10 minutes (from the repository root, with medfm installed):
#   bash bench/gpu_check.sh            # results in bench/results/gpu_*.json (OUT=DIR elsewhere)
# 1. smoke (under 4 minutes): 20 bf16 steps of every method through `medfm pretrain` on the GPU, with the figures
#    and the kNN monitor every 10 steps; SimCLR ResNet-18 (BatchNorm) and MAE ViT-Tiny (figures) under DeepSpeed
#    ZeRO-2 too; the distillation from the DINO run's release; then `medfm eval` of the DINO release. Pass / fail,
#    exit code and seconds of each run in OUT/gpu_check.json, written after each run;
# 2. throughput: bf16 images/s, peak memory, model FLOP utilisation (FLOPs counted by torch per step, against
#    989 dense bf16 TFLOP/s) and host syncs per optimizer step of MAE ViT-B/16, DINO ViT-S/16 and DINOv2 ViT-S/14
#    at 224 px (their multi-crop), through medfm's engine and a bare PyTorch loop (OUT/gpu_pretrain.json,
#    rewritten after every timed block);
# 3. the data path: images/s per CPU core of DINO's multi-crop views decoded from shards (OUT/gpu_data_path.json).
# Every stage runs under `timeout` within the script's budget (BUDGET_S, default 570 s) and writes each figure as
# soon as it has it: a stage that runs out of time keeps what it measured, and gpu_check.json says which timed out.
# Data: PneumoniaMNIST from $MEDFM_SHARED_DATA, ../shared/data or shared/data (as `medfm demo` looks), else a small
# labeled set (CT / MR / ultrasound) cut from the real images inside the pydicom and nibabel wheels.
# All run output goes to OUT/gpu_check.log.
set -uo pipefail
export PYTHONUNBUFFERED=1  # a run stopped by its time limit still leaves its last lines in the log
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check.json"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/medfm-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$((SECONDS + ${BUDGET_S:-570}))
: >"$LOG"
rm -f "$SUMMARY"

# record STAGE NAME STATUS SECONDS EXIT_CODE [LOGFILE [RUN_DIR]]: one entry of gpu_check.json, rewritten at once
record() {
    python - "$SUMMARY" "$@" <<'PY'
import json, os, sys
from pathlib import Path

path, stage, name, status, seconds, code, *rest = sys.argv[1:]
try:
    data = json.loads(Path(path).read_text())
except (OSError, ValueError):
    data = {}
entry = {"status": status, "seconds": round(float(seconds), 1), "exit_code": int(code)}
if len(rest) > 1 and rest[1] and Path(rest[1], "metrics.jsonl").is_file():  # a pretraining run: what its monitor wrote
    lines = [json.loads(line) for line in Path(rest[1], "metrics.jsonl").read_text().splitlines() if line.strip()]
    entry["knn_acc"] = {row["step"]: round(row["knn_acc"], 4) for row in lines if "knn_acc" in row}
    entry["last_loss"] = next((row["loss"] for row in reversed(lines) if "loss" in row), None)
    entry["figures"] = len(list(Path(rest[1], "figures").glob("*-step*.png")))
    entry["released"] = Path(rest[1], "release").is_dir()
if rest and status != "pass":
    entry["log_tail"] = Path(rest[0]).read_text(errors="replace").splitlines()[-15:]
data.setdefault(stage, {})[name] = entry
Path(path + ".tmp").write_text(json.dumps(data, indent=2) + "\n")
os.replace(path + ".tmp", path)
PY
}

# left LIMIT: seconds a stage may still run (its own limit, or what is left of the budget)
left() {
    local remaining=$((DEADLINE - SECONDS))
    if ((remaining < $1)); then echo $((remaining > 0 ? remaining : 1)); else echo "$1"; fi
}

# run STAGE NAME LIMIT [RUN_DIR] -- COMMAND...: run under timeout, log, record pass / fail / timeout and seconds
run() {
    local stage=$1 name=$2 limit run_dir="" start rc status seconds
    limit=$(left "$3")
    shift 3
    if [[ $1 != -- ]]; then
        run_dir=$1
        shift
    fi
    shift
    local log="$WORK/$stage-$name.log"
    echo "== $stage / $name (at most ${limit} s): $*" | tee -a "$LOG"
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    if [[ $status == pass && -n $run_dir && ! -d $run_dir/release ]]; then
        status=fail  # a pretraining run ends with its release
    fi
    cat "$log" >>"$LOG"
    echo "== $stage / $name: $status (exit $rc, $seconds s)" | tee -a "$LOG"
    record "$stage" "$name" "$status" "$seconds" "$rc" "$log" "$run_dir"
    [[ $status == pass ]]
}

echo "== environment" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
if ! run env torch 60 -- python -c '
import torch
assert torch.cuda.is_available(), "no CUDA device: bench/gpu_check.sh measures the GPU paths"
print("torch", torch.__version__, "device", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
'; then
    echo "no usable CUDA device: see $LOG" >&2
    exit 1
fi

# --- 1. smoke: every method through the CLI, 20 bf16 steps, figures + kNN every 10 steps --------------------------
SMOKE_END=$((SECONDS + ${SMOKE_S:-235}))
smoke_left() {
    local remaining=$((SMOKE_END - SECONDS))
    left $((remaining < $1 ? (remaining > 0 ? remaining : 1) : $1))
}
LABELED=""
for folder in ${MEDFM_SHARED_DATA:+"$MEDFM_SHARED_DATA"} ../shared/data shared/data; do
    if [[ -f $folder/medmnist/pneumoniamnist.npz ]]; then
        LABELED="$folder/medmnist/pneumoniamnist.npz"
        break
    fi
done
if [[ -z $LABELED ]]; then
    LABELED="$WORK/modality28.npz"
    run smoke labeled_set_from_wheels "$(smoke_left 60)" -- python - "$LABELED" <<'PY'
"""A 3-class labeled set (CT / MR / ultrasound) in MedMNIST's layout at 28 px: random crops of the real images
inside the pydicom and nibabel wheels (medfm.data_shards.discover.sample_files), min-max scaled to uint8."""
import sys

import nibabel
import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from medfm.data_shards.discover import sample_files

slices = {0: [], 1: [], 2: []}  # CT, MR, US
for path in sample_files():
    try:
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            pixels = np.asarray(ds.pixel_array, dtype=np.float32)
            label = {"CT": 0, "MR": 1, "US": 2}[ds.Modality]
            pixels = pixels.mean(-1) if label == 2 else pixels  # ultrasound: RGB frames -> gray
            slices[label] += list(pixels) if pixels.ndim == 3 else [pixels]
        else:
            image = nibabel.load(path)
            volume = np.asanyarray(image.dataobj, dtype=np.float32).reshape(*image.shape[:2], -1)
            slices[1] += [volume[..., i] for i in range(volume.shape[-1])]
    except Exception as err:  # e.g. no JPEG 2000 decoder installed: the other files suffice
        print(f"skipped {path.name}: {err}")
assert all(slices.values()), {label: len(pool) for label, pool in slices.items()}
generator = torch.Generator().manual_seed(0)


def crop(image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image)[None, None]
    height, width = image.shape
    side = int(min(height, width) * float(torch.empty(()).uniform_(0.4, 1.0, generator=generator)))
    top = int(torch.randint(0, height - side + 1, (), generator=generator))
    left = int(torch.randint(0, width - side + 1, (), generator=generator))
    x = F.interpolate(x[..., top : top + side, left : left + side], size=(28, 28), mode="bilinear", antialias=True)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-6)
    return (x[0, 0] * 255).round().to(torch.uint8).numpy()


arrays = {}
for split, per_class in (("train", 120), ("val", 40), ("test", 40)):
    images, labels = [], []
    for label, pool in slices.items():
        for _ in range(per_class):
            images.append(crop(pool[int(torch.randint(0, len(pool), (), generator=generator))]))
            labels.append([label])
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = np.stack(images), np.array(labels, dtype=np.uint8)
np.savez_compressed(sys.argv[1], **arrays)
print(sys.argv[1], {k: v.shape for k, v in arrays.items()})
PY
fi
echo "labeled set: $LABELED" | tee -a "$LOG"
BATCH=64
COMMON=(
    "data.spec=medmnist:$LABELED" "data.num_workers=4" "data.samples_per_epoch=$((20 * BATCH))"
    "train.batch_size=$BATCH" "train.precision=bf16" "schedule.epochs=1" "schedule.warmup_epochs=0"
    "logging.every_steps=5" "logging.figure_every_steps=10" "logging.trackers=[]" "logging.progress_bar=false"
    "knn.spec=medmnist:$LABELED" "knn.every_steps=10" "knn.max_samples=500" "checkpoint.every_steps=10"
)
ZERO2=("dist.backend=deepspeed" "dist.zero_stage=2")
# pretrain NAME RECIPE [OVERRIDES...]: 20 steps into WORK/runs/NAME
pretrain() {
    local name=$1 recipe=$2
    shift 2
    run smoke "$name" "$(smoke_left "${RUN_S:-60}")" "$WORK/runs/$name" -- \
        medfm pretrain --config "configs/pretrain/$recipe" "${COMMON[@]}" "train.run_dir=$WORK/runs/$name" "$@"
}
pretrain simclr_resnet18_zero2 simclr_resnet18_pneumonia28.yaml "${ZERO2[@]}"
pretrain mae_vit_tiny_zero2 mae_vit_tiny_pneumonia28.yaml "${ZERO2[@]}"
pretrain dino_vit_tiny dino_vit_tiny_pneumonia28.yaml
pretrain dinov2_vit_tiny dinov2_vit_tiny_pneumonia28.yaml
pretrain mae_vit_tiny mae_vit_tiny_pneumonia28.yaml
pretrain moco_v3_vit_tiny moco_v3_vit_tiny_pneumonia28.yaml
pretrain simclr_resnet18 simclr_resnet18_pneumonia28.yaml
pretrain distill_from_dino distill_vitb14_to_vits16_224.yaml "distill.teacher=$WORK/runs/dino_vit_tiny" \
    "distill.teacher_img_size=28" "distill.teacher_dim=null" "data.img_size=28" "model.backbone=vit_tiny_patch16_224" \
    "model.backbone_kwargs={patch_size: 4}" "model.drop_path_rate=0.0"
run smoke eval_dino_release "$(smoke_left 60)" -- medfm eval --backbone "$WORK/runs/dino_vit_tiny" \
    --data "medmnist:$LABELED" --out "$WORK/eval" "linear.weight_decays=[1e-4,1e-2]"

# --- 2. throughput: engine vs bare loop, bf16, 224 px ----------------------------------------------------------------
run throughput bench_pretrain "$(left 250)" -- python bench/bench_pretrain.py --precision bf16 --batch 64 --steps 15 \
    --repeats 2 --log-every 20 --flops --count-syncs --peak-tflops "${PEAK_TFLOPS:-989}" \
    --recipe mae=mae_vit_b16_224.yaml dino=dino_vit_s16_224.yaml dinov2=dinov2_vit_s14_224.yaml \
    --json "$OUT/gpu_pretrain.json"

# --- 3. data path: DINO multi-crop from shards, per core -------------------------------------------------------------
run data_path dino_multicrop "$(left 75)" -- python bench/bench_data.py --multicrop dino_vit_s16_224.yaml \
    --samples 400 --json "$OUT/gpu_data_path.json"

echo "== done in $SECONDS s: $SUMMARY" | tee -a "$LOG"
python - "$SUMMARY" <<'PY'
import json, sys

runs = json.load(open(sys.argv[1]))
failed = [f"{stage}/{name}" for stage, entries in runs.items() for name, entry in entries.items() if entry["status"] != "pass"]
print("not passed:", failed or "none")
sys.exit(1 if failed else 0)
PY
