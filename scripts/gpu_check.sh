#!/usr/bin/env bash
# Every GPU check and benchmark in one call (device machine): `bash scripts/gpu_check.sh` with $OUT set.
# Dispatchers use every GPU (R = 1 on a one-GPU machine); runner benchmarks use GPU 0. Everything lands in $OUT/results.tgz
# (the device tool brings back few files); summaries go to stdout.
#   SKIP_RUNNERS=1  skip the runner benchmarks (RUNNER_BENCHES="..." picks some, RUNNER_ARGS="--quick" shortens them);  SKIP_BENCH=1  skip `ep-runtime bench`.
set -u
OUT=${OUT:-/tmp/ep_gpu}
W=$(mktemp -d)
REPO=$(pwd)
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python -m pip install -q --no-deps --no-build-isolation . >"$W/install.log" 2>&1 || tail -5 "$W/install.log"
(cd /tmp && python -c "import ep_runtime.dispatchers as d; print('ep_runtime from', d.__file__)")
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU"; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
if [ "$NGPU" -ge 1 ]; then  # one GPU: the checks run with R = 1 (exchange numbers then mean little)
  timeout 300 torchrun --nproc-per-node "$NGPU" benchmarks/gpu_dispatch.py --out "$W" >"$W/dispatch.log" 2>&1
  echo "gpu_dispatch rc=$?"; tail -120 "$W/dispatch.log"
  if [ "${SKIP_BENCH:-0}" != 1 ]; then
    (cd /tmp && timeout 240 torchrun --nproc-per-node "$NGPU" -m ep_runtime bench --preset deepseek-v3 \
       --tokens 128,1024,4096 --suite dispatch --no-progress --json "$W/bench_dispatch.json" \
       --markdown "$W/bench_dispatch.md" --plot "$W/bench_dispatch.png") >"$W/bench.log" 2>&1
    echo "ep-runtime bench rc=$?"; tail -40 "$W/bench.log"
  fi
fi
if [ "$NGPU" -ge 1 ] && [ "${SKIP_EXAMPLES:-0}" != 1 ]; then
  (cd /tmp && timeout 240 torchrun --nproc-per-node "$(( NGPU < 2 ? NGPU : 2 ))" "$REPO/examples/inference_cuda_graph.py") >"$W/example_graph.log" 2>&1
  echo "inference_cuda_graph rc=$?"; tail -15 "$W/example_graph.log"
fi
if [ "${SKIP_PYTEST:-0}" != 1 ]; then  # the tests marked gpu (outside the repo root so the installed package is used)
  (cd /tmp && timeout 300 python -m pytest -q -m gpu -p no:cacheprovider --rootdir "$REPO" "$REPO/tests") >"$W/pytest_gpu.log" 2>&1
  echo "pytest -m gpu rc=$?"; tail -15 "$W/pytest_gpu.log"
fi
if [ "${SKIP_RUNNERS:-0}" != 1 ]; then
  for bench in ${RUNNER_BENCHES:-benchmarks/bench_triton_runner.py benchmarks/bench_masked_runner.py}; do
    [ -f "$bench" ] || continue
    name=$(basename "$bench" .py)
    mkdir -p "$W/$name"
    CUDA_VISIBLE_DEVICES=0 timeout 240 python "$REPO/$bench" --out "$W/$name" ${RUNNER_ARGS:-} >"$W/$name.log" 2>&1
    echo "$name rc=$?"; tail -40 "$W/$name.log"
  done
fi
tar czf "$OUT/results.tgz" -C "$W" .
cp "$W"/*.md "$OUT"/ 2>/dev/null || true
