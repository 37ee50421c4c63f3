#!/usr/bin/env bash
# Device check of the distributed fits (issue 19), for a machine with a GPU and no network:
#   GPU: 2 ranks on the GPU(s) equal to one process bitwise (NCCL with >= 2 GPUs, else gloo);
#   CPU: the fast distributed tests; then the 1-vs-2 process benchmark on its idle cores.
# Prepare here (pure-Python wheels the device image lacks):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
# Run there (device tool): carry [".whl"], command "bash tests/gpu_distributed.sh", ~6 minutes.
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; nproc
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'gpus', torch.cuda.device_count())"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py \
  -m "gpu or not slow" 2>&1 | tee "$OUT/distributed_tests.log"
timeout 240 python3 benchmarks/distributed.py --repeats 3 --name distributed_device 2>&1 \
  | tee "$OUT/distributed_bench.log"
cp benchmarks/results/distributed_device.md "$OUT/" 2>/dev/null
echo done
