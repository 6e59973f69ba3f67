#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool's `run`, from the repository root): the benchmark suite
# with --gpu, then the fast test tier, every log under $OUT. About 10 minutes; give it timeout_s=600.
#
# That machine has jax, flax, optax, orbax, torch and transformers but none of ml-collections,
# tensorflow-datasets, array-record, rax or tensorboardX: fetch them here as Python 3.12 wheels into .whl/
# (see /work/.library/device/README.md for the `pip download` line) and name `.whl` in the call's carry:
#     ml_collections tensorflow_datasets array_record rax tensorboardX (+ their missing requirements)
set -uo pipefail
OUT=${OUT:-/tmp/pl_dpo_gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
timeout 420 python3 -m benchmarks.run --gpu --out="$OUT" 2>&1 | tee "$OUT/benchmarks.log"
# The numeric tests on the GPU itself (JAX_PLATFORMS=cuda: one device, so the 8-device mesh tests are left
# out): model parity with Hugging Face, log-probs, losses, packing (the cuDNN attention path included).
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -k "not 8_devices and not sharded" \
  tests/test_models.py tests/test_hf_parity.py tests/test_logprobs.py tests/test_losses.py tests/test_packing.py \
  2>&1 | tee "$OUT/tests_gpu.log"
