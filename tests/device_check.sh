#!/usr/bin/env bash
# One device check (a machine with a GPU and idle CPU cores, no network), everything at once:
#   GPU   the tests marked `gpu` (fits, prediction, evaluation, CLI, distributed ranks on the GPU)
#   CPU   benchmarks that need idle cores, each pinned to its own cores:
#         nuts_vs_numpyro --full (issue 17; NumPyro and JAX are installed there),
#         distributed.py 1 vs 2 processes (issue 19), svi_step.py (issue 14).
# Prepare here (pure-Python wheels the device image lacks; see tests/gpu_distributed.sh):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2
# Run there (device tool): carry [".whl"], command "bash tests/device_check.sh", ~8 minutes.
# QUICK=1 runs tiny versions (a smoke test of this script on any machine).
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-450}
nvidia-smi -L 2>/dev/null; nproc
$PY -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'gpus', torch.cuda.device_count())"

# cores: pin each job where there are enough of them, else share
if [ "$(nproc)" -ge 16 ]; then
  pin() { taskset -c "$1" "${@:2}"; }
else
  pin() { "${@:2}"; }
fi
if [ -n "$QUICK" ]; then
  NUTS="--warmup 20 --samples 20 --seeds 1"; DIST="--quick --repeats 1"; SVI="--rounds 1 --no-write"
else
  NUTS="--full"; DIST="--repeats 3"; SVI="--rounds 5"
fi

pin 2 timeout "$LIMIT" $PY benchmarks/nuts_vs_numpyro.py $NUTS --models mlp \
  --name nuts_vs_numpyro_device_mlp > "$OUT/nuts_mlp.log" 2>&1 &
pin 3 timeout "$LIMIT" $PY benchmarks/nuts_vs_numpyro.py $NUTS --models bnn-example \
  --name nuts_vs_numpyro_device_bnn > "$OUT/nuts_bnn.log" 2>&1 &
pin 4-7 timeout "$LIMIT" $PY benchmarks/distributed.py $DIST --name distributed_device \
  > "$OUT/distributed_bench.log" 2>&1 &
pin 8 timeout "$LIMIT" $PY benchmarks/svi_step.py $SVI > "$OUT/svi_step.log" 2>&1 &
pin 10-15 timeout "$LIMIT" $PY -m pytest -q -p no:cacheprovider -rs -m gpu \
  --continue-on-collection-errors tests/test_gpu.py tests/test_distributed.py \
  tests/test_evaluation.py tests/test_cli.py tests/test_reliability_kinds.py \
  > "$OUT/gpu_tests.log" 2>&1 &
wait
tail -n 3 "$OUT"/*.log
echo done
