#!/usr/bin/env bash
# One prepared check for a machine with a GPU (not part of the test suite; CI has no GPU):
# a short data-free distillation on --accelerator gpu, then the same run on the CPU, and a check
# that both wrote a student that loads and predicts. About 2 minutes with the install.
#   bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-/tmp}/gpu_check}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('device:', torch.cuda.get_device_name(0))"
for preset in dfq fast; do
  datafree distill --preset "$preset" --steps 60 --eval-every 20 --checkpoint-every 30 --accelerator gpu --devices 1 \
      --out "$out/gpu-$preset" --overwrite --no-progress --no-eval
  # resume on the GPU: the checkpoint written there must load there
  datafree distill --out "$out/gpu-$preset" --resume --steps 80 --accelerator gpu --devices 1 --no-progress
done
datafree distill --preset dfq --steps 60 --eval-every 20 --accelerator cpu --out "$out/cpu-dfq" --overwrite --no-progress --no-eval
python3 - "$out" <<'PY'
import json, sys, torch
out = sys.argv[1]
for run in ("gpu-dfq", "gpu-fast", "cpu-dfq"):
    summary = json.load(open(f"{out}/{run}/summary.json"))
    program = torch.export.load(f"{out}/{run}/student.pt2").module()
    assert program(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    print(run, "rounds", summary["steps"], "seconds", summary["seconds"], "schedule", summary["schedule"].get("student_steps"))
PY
echo "gpu check passed"
