#!/usr/bin/env bash
# The check for a machine with a GPU (not part of the test suite; CI has no GPU). Each check prints
# one line, "ok NAME: ..." or "FAIL NAME: ...", and the script exits 1 if any failed. It needs no
# real data: condensation starts from a distill run's transfer set, and the evaluation scores on the
# run's held-out synthetic images (labelled by the teacher). About 5 minutes with the install.
#   bash scripts/gpu_check.sh [OUT_DIR]
# Checks (assertions in scripts/gpu_checks.py): the device each run used, a resume on the GPU
# reaching the asked round count, a GPU and a CPU run of one config agreeing with the teacher on
# held-out synthetic images within TOLERANCE points, a pixel preset with --schedule auto, a .pt2
# teacher, condense and evaluate-set on the GPU, and 2-GPU DDP when two GPUs are visible.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:-/tmp}/gpu_check}
TOLERANCE=${TOLERANCE:-10}  # points of held-out agreement between a GPU and a CPU run (same seed, other numerics)
mkdir -p "$out"
failed=0
say() { echo "$@" | tee -a "$out/checks.txt"; }
run() {  # run NAME COMMAND...: output to OUT/NAME.log; a failure is one FAIL line and the log's end
  local name=$1; shift
  "$@" >"$out/$name.log" 2>&1
  local status=$?
  if [ "$status" != 0 ]; then say "FAIL $name: exit status $status"; tail -n 5 "$out/$name.log" | sed 's/^/    /'; failed=1; return 1; fi
}
check() {  # check NAME: the assertions of scripts/gpu_checks.py
  local detail
  if detail=$(python3 "$here/gpu_checks.py" "$1" "$out" "$TOLERANCE" 2>&1); then say "ok $1: $detail"
  else say "FAIL $1: $(echo "$detail" | tail -n 1)"; failed=1; fi
}

python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || { say "FAIL device: no CUDA device visible"; exit 1; }
say "ok device: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__)')"
common=(--eval-every 20 --checkpoint-every 30 --no-progress --no-eval --overwrite)

run gpu-dfq datafree distill --preset dfq --steps 60 "${common[@]}" --accelerator gpu --out "$out/gpu-dfq" &&
  run gpu-dfq-resume datafree distill --out "$out/gpu-dfq" --resume --steps 80 --accelerator gpu --no-progress &&
  check resume-on-gpu
run cpu-dfq datafree distill --preset dfq --steps 80 "${common[@]}" --accelerator cpu --out "$out/cpu-dfq" &&
  check gpu-vs-cpu
run gpu-fast-auto datafree distill --preset fast --schedule auto --steps 60 "${common[@]}" --accelerator gpu --out "$out/gpu-fast-auto" &&
  check pixels-schedule-auto
run export-pt2 datafree teacher export assets/teachers/mnist_lenet5.safetensors --to "$out/teacher.pt2" --overwrite &&
  run gpu-pt2 datafree distill --teacher "$out/teacher.pt2" --steps 60 "${common[@]}" --accelerator gpu --out "$out/gpu-pt2" &&
  check pt2-teacher
run gpu-condense datafree condense --source "$out/gpu-dfq" --ipc 10 --method dm --steps 50 --accelerator gpu --no-progress \
    --overwrite --out "$out/gpu-condense" &&
  run holdout-test python3 "$here/gpu_checks.py" holdout-test-set "$out" &&
  run gpu-evaluate datafree evaluate-set "$out/gpu-condense" --test "$out/holdout_test.npz" --models 1 --epochs 5 \
      --accelerator gpu --no-progress --out "$out/gpu-evaluate" &&
  check condense-evaluate
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  run gpu-ddp datafree distill --preset dfq --steps 60 "${common[@]}" --accelerator gpu --devices 2 --strategy ddp --out "$out/gpu-ddp" &&
    check ddp-2-gpus
else
  say "ok ddp-2-gpus: skipped, one GPU visible"
fi
if [ "$failed" = 0 ]; then say "gpu check passed"; else say "gpu check FAILED"; exit 1; fi
