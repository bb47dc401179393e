#!/usr/bin/env bash
# Run ON the lent GPU machine, from the repository root, after bench/device/prepare.sh here:
#     bash bench/device/check.sh suite            # then: kaggle speed; then: ablate (one device call each,
#                                                 # 600 s at most per call)
# suite : the whole pytest suite on CUDA (tests/test_cuda.py first).
# kaggle: the Kaggle command stopped by `timeout` mid-run (SIGTERM to the process group), then resumed
#         from last.pth.
# speed : bench/train_step.py (edgenext_base and edgenext_small, 384 px, batch 16, 7 experts, deep
#         supervision: bf16 / fp32 / channels_last / grad checkpointing / compile), bench/data.py,
#         bench/evaluate.py.
# ablate: the decisive rows of bench/ablate.py with edgenext_small at 352 px, 30 epochs (CONFIGS=...).
# Each step has its own time limit; each phase's logs are one .tgz in $OUT, rewritten after every step
# (the device tool returns at most 8 files), and a line per step goes to $OUT/summary.txt.
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
DATA=${DATA:-.data/kvasir_seg}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $W/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout -k 15 "$limit" "$@" > "$W/$name.log" 2>&1
  rc=$?
  echo "$PHASE/$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tar czf "$OUT/$PHASE.tgz" -C "$W" .  # after every step: a call cut off at its limit still returns the rest
}

phase_suite() {
  step env 60 $PY -c "import torch, timm, albumentations, py_sod_metrics; print(torch.__version__, timm.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvidia-smi > "$W/nvidia-smi.txt" 2>&1
  step pytest_cuda 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
  step pytest_all 400 $PY -m pytest -q -rs -p no:cacheprovider --durations=15
}

phase_kaggle() {
  # the Kaggle command (README), offline weights, stopped by `timeout` (SIGTERM to the process group) and resumed
  local ck=/tmp/kaggle_ckpt
  rm -rf $ck
  local flags=(--dataset-path "$DATA" --checkpoint-dir $ck --backbone edgenext_base --no-pretrained --num-experts 7
               --deep-supervision --batch-size 2 --accumulation-steps 4 --img-size 384 --epochs 3 --stage1-epochs 1
               --lr 2.5e-4 --stage2-lr 2e-4 --scheduler cosine --min-lr 1e-5 --warmup-epochs 1 --progressive-unfreeze
               --ema --num-workers 4 --no-progress)
  step kaggle_timeout 75 $PY train_ultimate.py train "${flags[@]}"
  step kaggle_resume 180 $PY train_ultimate.py train "${flags[@]}" --resume-from $ck/last.pth
  cp $ck/metrics.csv $ck/train.log "$W/" 2>/dev/null
}

phase_speed() {
  local ts=(bench/train_step.py --device cuda --img-size 384 --batch-size 16 --num-experts 7 --deep-supervision --json)
  step ts_base_bf16 60 $PY "${ts[@]}" --backbone edgenext_base --precision bf16 --breakdown
  step ts_base_fp32 60 $PY "${ts[@]}" --backbone edgenext_base --precision fp32
  step ts_base_bf16_cl 60 $PY "${ts[@]}" --backbone edgenext_base --precision bf16 --channels-last
  step ts_base_bf16_gc 60 $PY "${ts[@]}" --backbone edgenext_base --precision bf16 --grad-checkpointing
  step ts_small_bf16 60 $PY "${ts[@]}" --backbone edgenext_small --precision bf16
  step ts_small_fp32 60 $PY "${ts[@]}" --backbone edgenext_small --precision fp32
  step ts_base_bf16_compile 150 $PY "${ts[@]}" --backbone edgenext_base --precision bf16 --compile
  step data 90 $PY bench/data.py --dataset-path "$DATA" --generated 64 --workers 1 2 4 8 --json
  step evaluate 90 $PY bench/evaluate.py --device cuda --dataset-path "$DATA" --generated 32 --num-workers 4 \
    --metric-workers 0 2 4 8 --json
}

phase_ablate() {
  step ablate 540 $PY bench/ablate.py --data "$DATA" --out /tmp/ablate_gpu --device cuda --backbone edgenext_small \
    --img-size 352 --epochs 30 --configs "${CONFIGS:-defaults,aug-none}" --seeds 1 2 --jobs 2 --num-workers 6 --no-compare
  cp /tmp/ablate_gpu/table.md /tmp/ablate_gpu/results.json "$W/" 2>/dev/null
}

for PHASE in "$@"; do
  W=/tmp/device_$PHASE
  rm -rf "$W" && mkdir -p "$W"
  case $PHASE in
    suite|kaggle|speed|ablate) "phase_$PHASE" ;;
    *) echo "unknown phase $PHASE (suite | kaggle | speed | ablate)"; exit 2 ;;
  esac
  tar czf "$OUT/$PHASE.tgz" -C "$W" .
done
cat "$OUT/summary.txt"
