#!/usr/bin/env bash
# Every GPU check and benchmark in one call (device machine): `bash scripts/gpu_check.sh` with $OUT set.
# Dispatchers need >= 2 GPUs; runner benchmarks use GPU 0. Results: $OUT/*.json, $OUT/*.md, logs.
set -u
OUT=${OUT:-/tmp/ep_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python -m pip install -q --no-deps --no-build-isolation . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
(cd /tmp && python -c "import ep_runtime.dispatchers as d; print('ep_runtime from', d.__file__)")
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU"; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
if [ "$NGPU" -ge 2 ]; then
  timeout 300 torchrun --nproc-per-node "$NGPU" benchmarks/gpu_dispatch.py --out "$OUT" >"$OUT/dispatch.log" 2>&1
  echo "dispatch rc=$?"; tail -60 "$OUT/dispatch.log"
fi
for bench in benchmarks/bench_triton_runner.py benchmarks/bench_masked_runner.py; do
  if [ -f "$bench" ] && [ "${SKIP_RUNNERS:-0}" != 1 ]; then
    name=$(basename "$bench" .py)
    CUDA_VISIBLE_DEVICES=0 timeout 240 python "$bench" --out "$OUT" >"$OUT/$name.log" 2>&1
    echo "$name rc=$?"; tail -30 "$OUT/$name.log"
  fi
done
