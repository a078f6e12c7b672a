#!/usr/bin/env bash
# Run every script for a few steps on a CUDA GPU: the checks CI (a CPU machine) cannot do.
#
#     bash scripts/gpu_check.sh [OUTDIR [PARTS]]
#
# OUTDIR defaults to out/gpu_check, PARTS to "train compile memory"; DEVICE=cpu runs the same commands on a
# machine without a GPU (to check the script itself).
#
# 1. each training script, default dtype (bfloat16 autocast on CUDA), tiny step counts, chained as in
#    `make demo` (dVAE -> CLIP -> transformer -> prior -> decoder -> upsampler), then both sample.py pipelines,
#    variations and interpolation; 2. the same training steps through --compile; 3. the memory plan of
#    --dry-run against the peak measured on the GPU (--measure-memory), for each stage's small preset.
# Each step's status goes to OUTDIR/summary.txt ("ok" or "FAIL rc=N"), its output to OUTDIR/<step>.log.
set -u
OUT_DIR=${1:-out/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$? t1=$(date +%s)
    if [ $rc -eq 0 ]; then echo "ok          $name ($((t1 - t0)) s)" | tee -a "$SUMMARY"
    else echo "FAIL rc=$rc $name ($((t1 - t0)) s): $(tail -n 1 "$OUT_DIR/$name.log")" | tee -a "$SUMMARY"; fi
}

PARTS=${2:-train compile memory}
has() { [[ " $PARTS " == *" $1 "* ]]; }
R=$OUT_DIR/runs
common=(--device $DEV --log-every 10)
if has train; then
step dvae        300 $PY train_dvae.py "${common[@]}" --steps 40 --eval-every 20 --out $R/dvae
step clip        300 $PY train_clip.py "${common[@]}" --steps 40 --eval-every 20 --out $R/clip
step transformer 300 $PY train_transformer.py "${common[@]}" --steps 40 --eval-every 20 --dvae $R/dvae/ckpt.pt \
    --clip $R/clip --judge-captions 8 --out $R/dalle
step prior       300 $PY train_prior.py "${common[@]}" --steps 40 --eval-every 20 --clip $R/clip --out $R/prior
step decoder     300 $PY train_decoder.py "${common[@]}" --steps 40 --eval-every 20 --clip $R/clip \
    --prior $R/prior --judge-captions 4 --ddpm-captions 0 --out $R/decoder
step upsampler   300 $PY train_decoder.py "${common[@]}" --stage upsampler --steps 40 --eval-every 20 --out $R/upsampler
step resume      300 $PY train_dvae.py "${common[@]}" --steps 60 --eval-every 20 --out $R/dvae --resume
P=(--prompt "a small red circle at the top" --prompt "two blue squares")
step sample_dalle1 300 $PY sample.py --device $DEV "${P[@]}" --num 8 --dvae $R/dvae/ckpt.pt --clip $R/clip \
    --dalle $R/dalle --out $OUT_DIR/dalle1
step sample_dalle2 300 $PY sample.py --device $DEV --pipeline dalle2 "${P[@]}" --num 4 --clip $R/clip \
    --prior $R/prior --decoder $R/decoder --upsampler $R/upsampler --steps 20 --out $OUT_DIR/dalle2
step interpolate 300 $PY sample.py --device $DEV --pipeline dalle2 --interpolate $OUT_DIR/dalle1/000_0.png \
    $OUT_DIR/dalle1/001_0.png --frames 4 --clip $R/clip --decoder $R/decoder --upsampler $R/upsampler --steps 10 \
    --out $OUT_DIR/interpolate
step variations  300 $PY sample.py --device $DEV --pipeline dalle2 --variations $OUT_DIR/dalle1/grid.png --num 2 \
    --clip $R/clip --decoder $R/decoder --upsampler $R/upsampler --steps 10 --out $OUT_DIR/variations
fi

if has compile; then  # stands alone: the compiled dVAE and CLIP feed the compiled transformer, prior, decoder
C=(--compile --steps 30 --eval-every 30)
step compile_dvae        400 $PY train_dvae.py "${common[@]}" "${C[@]}" --out $R/compile_dvae
step compile_clip        400 $PY train_clip.py "${common[@]}" "${C[@]}" --out $R/compile_clip
step compile_transformer 400 $PY train_transformer.py "${common[@]}" "${C[@]}" --dvae $R/compile_dvae \
    --judge-captions 0 --out $R/compile_dalle
step compile_prior       400 $PY train_prior.py "${common[@]}" "${C[@]}" --clip $R/compile_clip --out $R/compile_prior
step compile_decoder     400 $PY train_decoder.py "${common[@]}" "${C[@]}" --clip $R/compile_clip --judge-captions 0 \
    --out $R/compile_decoder
fi

if has memory; then
step mem_dvae        300 $PY train_dvae.py --size small --device $DEV --dry-run --measure-memory
step mem_clip        300 $PY train_clip.py --size small --device $DEV --dry-run --measure-memory
step mem_transformer 300 $PY train_transformer.py --size small --device $DEV --dry-run --measure-memory
step mem_prior       300 $PY train_prior.py --size small --device $DEV --dry-run --measure-memory
step mem_decoder     300 $PY train_decoder.py --size small --device $DEV --dry-run --measure-memory
grep -h "measured on" "$OUT_DIR"/mem_*.log | tee -a "$SUMMARY"
fi
