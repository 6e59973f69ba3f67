#!/usr/bin/env bash
# Set up pl_dpo on a Cloud TPU VM (run on every worker of a pod slice, e.g. with
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="bash pl_dpo/tpu_setup.sh"`).
#
# Creates .venv next to this script, installs JAX for TPU and pl_dpo, then prints the
# devices JAX sees. Models and datasets are NOT downloaded here: copy them to local disk
# (or a bucket) first and pass their folders in the config (see configs/spin.py).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The TPU build of jaxlib comes from the libtpu release index.
.venv/bin/pip install -q "jax[tpu]>=0.10.2,<0.13" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
.venv/bin/pip install -q -e .
.venv/bin/python -c "import jax; print(jax.process_index(), jax.process_count(), jax.devices())"
cat <<'MSG'
Ready. Multi-host run (all workers at once):
  .venv/bin/python -m pl_dpo.main --distributed --config=configs/spin.py --workdir=/mnt/shared/spin \
      --config.model.hf_path=/data/zephyr-7b-sft-full \
      --config.data.files.train=/data/ultrachat_200k/train_sft.parquet \
      --config.data.files.test=/data/ultrachat_200k/test_sft.parquet
MSG
