#!/usr/bin/env bash
# A lent GPU machine (the device tool's `run`, from the repository root): the benchmark suite with --gpu and
# the numeric tests on the card, every log and result under $OUT. One call is limited to 10 minutes, and on
# an H200 the parts take: logprob_kernel + train_step ~5 min, sampler + self_play_round ~2.5 min, the
# numeric tests > 5 min (compiles dominate). So three calls, timeout_s=600 each:
#     bash benchmarks/gpu_session.sh train      # logprob_kernel, train_step
#     bash benchmarks/gpu_session.sh rest       # sampler, self_play_round, lora_step
#     bash benchmarks/gpu_session.sh tests      # model / log-prob / loss / packing tests with JAX_PLATFORMS=cuda
# Merge the two result files with benchmarks.run.write_results (see BENCHMARKS.md, "GPU").
#
# That machine has jax, flax, optax, orbax, torch and transformers but none of ml-collections,
# tensorflow-datasets, array-record, rax or tensorboardX: fetch them here as Python 3.12 wheels into .whl/
# (see /work/.library/device/README.md for the `pip download` line) and name `.whl` in the call's carry:
#     ml_collections tensorflow_datasets tensorflow_metadata array_record rax tensorboardX immutabledict
#     promise (built with `pip wheel`) toml dm_tree termcolor simple_parsing docstring_parser
#     googleapis_common_protos
set -uo pipefail
part=${1:?usage: gpu_session.sh train|rest|tests}
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
case $part in
  train) timeout 560 python3 -m benchmarks.run --gpu --only=logprob_kernel,train_step --out="$OUT" 2>&1 \
           | grep -v "Loading weights" | tee "$OUT/benchmarks.log" ;;
  rest) timeout 560 python3 -m benchmarks.run --gpu --only=sampler,self_play_round,lora_step --out="$OUT" 2>&1 \
           | grep -v "Loading weights" | tee "$OUT/benchmarks.log" ;;
  # One device (JAX_PLATFORMS=cuda), so the 8-device mesh tests are left out; conftest asks for full float32
  # matmuls (no TF32) on a GPU. Verbose, so that a run cut by the timeout still names every test it finished.
  tests) JAX_PLATFORMS=cuda timeout 560 python3 -m pytest -v -p no:cacheprovider -rf --tb=short \
           -k "not 8_devices and not sharded" tests/test_models.py tests/test_hf_parity.py tests/test_logprobs.py \
           tests/test_losses.py tests/test_packing.py >"$OUT/tests_gpu.log" 2>&1
         grep -E "FAILED|passed|failed" "$OUT/tests_gpu.log" | tail -20 ;;
  *) echo "usage: gpu_session.sh train|rest|tests" >&2; exit 2 ;;
esac
