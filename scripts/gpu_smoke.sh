#!/usr/bin/env bash
# GPU smoke run: every command-line job of the README on CUDA with few steps (teacher training fp32 and bf16,
# f-distill one- and few-step, text-to-image f-distill, DDO, Diffusion-DPO, sampling, digits FD), then the test suite
# on a machine whose default device is the GPU. Prints one 'name rc seconds' line per job; logs go to $LOG_DIR.
#   bash scripts/gpu_smoke.sh                  # LOG_DIR=runs/gpu_smoke
#   DEVICE=cpu PYTEST=0 bash scripts/gpu_smoke.sh   # dry run of the jobs on CPU
# Needs a CUDA GPU and the package's dependencies; uses no downloads.
set -u
LOG_DIR=${LOG_DIR:-runs/gpu_smoke}
RUNS=${RUNS:-runs/gpu_smoke/runs}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: the same jobs on CPU (a dry run of this script)
mkdir -p "$LOG_DIR" "$RUNS"
FD="python3 -m fdistill.cli"
SUMMARY="$LOG_DIR/summary.txt"
: > "$SUMMARY"

job() {  # job NAME TIMEOUT_S COMMAND...: run, log to LOG_DIR/jobs.log, one summary line
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  { echo "=== $name: $*"; timeout "$limit" "$@"; } >> "$LOG_DIR/jobs.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || tail -n 25 "$LOG_DIR/jobs.log"
}

nvidia-smi -L
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"

job teacher_fp32 240 $FD train experiment=digits_teacher train.device=$DEVICE train.steps=300 train.progress=false \
    train.run_dir=$RUNS/teacher
job teacher_bf16 120 $FD train experiment=digits_teacher train.device=$DEVICE train.steps=100 train.progress=false \
    train.mixed_precision=bf16 train.run_dir=$RUNS/teacher_bf16
# train.fsdp=true on one process takes the plain path: this checks the flag is harmless on a single GPU
job teacher_fsdp_1proc 120 $FD train experiment=digits_teacher train.device=$DEVICE train.steps=50 train.progress=false \
    train.fsdp=true train.fsdp_min_params=1000 train.run_dir=$RUNS/teacher_fsdp
job distill_js 240 $FD distill train.device=$DEVICE train.steps=300 train.progress=false train.run_dir=$RUNS/distill
job distill_few_step 120 $FD distill train.device=$DEVICE train.steps=60 train.progress=false \
    'method.generator_sigma=null' 'method.generator_sigmas=[80.0,2.0]' train.run_dir=$RUNS/distill_few
job distill_learned_teacher 120 $FD distill train.device=$DEVICE train.steps=60 train.progress=false \
    model=pretrained model.path_or_hub_id=$RUNS/teacher/model method.features=fake_score \
    train.run_dir=$RUNS/distill_learned
job distill_text 240 $FD distill experiment=sd_tiny_fdistill train.device=$DEVICE train.steps=20 train.progress=false \
    train.run_dir=$RUNS/distill_text
job ddo 240 $FD train experiment=digits_ddo train.device=$DEVICE model.path_or_hub_id=$RUNS/teacher/model \
    method.rounds=2 method.steps_per_round=20 method.eval_every=10 method.eval_samples=200 train.steps=40 \
    train.progress=false train.run_dir=$RUNS/ddo
job dpo 240 $FD train experiment=dpo_tiny train.device=$DEVICE train.steps=10 train.progress=false train.run_dir=$RUNS/dpo
job sample_teacher 120 $FD sample --model $RUNS/teacher/model --num 64 --steps 20 --out $RUNS/samples_teacher --device $DEVICE
job sample_generator 120 $FD sample --model $RUNS/distill/model --num 64 --steps 1 --out $RUNS/samples_gen --device $DEVICE
job fid_digits 120 $FD fid --gen $RUNS/distill/model --num 500 --ref digits --features digits --device $DEVICE \
    --out $RUNS/fid.json --quiet
[ "${PYTEST:-1}" = 1 ] && job pytest 420 python3 -m pytest -q -n 8 -p no:cacheprovider
echo "--- summary"; cat "$SUMMARY"
