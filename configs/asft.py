"""aSFT (K=3): dataset answer > a larger assistant's sample > the policy's own sample.

    python -m pl_dpo.main --config=configs/asft.py --workdir=/mnt/shared/asft \
        --config.model.hf_path=/data/zephyr-7b-sft-full \
        "--config.assistants[0].model.hf_path=/data/Llama-3.1-70B-Instruct" \
        "--config.assistants[0].tokenizer_path=/data/Llama-3.1-70B-Instruct" \
        --config.data.files.train=/data/ultrachat_200k/train_sft.parquet \
        --config.data.files.test=/data/ultrachat_200k/test_sft.parquet

The SPIN setup of configs/spin.py with one more rank in the middle: the assistant's
samples are generated once (in its own chat template and tokenizer, then decoded and
tokenised again for the policy) and reused in every round; the policy's own sample is
redrawn each round from πθ(t), which is also the round's reference. Expected: above SPIN
at the same number of rounds when the assistant is clearly stronger than the policy (the
assistant sample then sits between the two ends of the ranking); on the built-in task
see experiments/RESULTS_study1.md and RESULTS.md for the measured comparisons.

`:N` sets the number of rounds (default 3).
"""

import ml_collections

from configs import spin
from configs.common import model, optimizer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = spin.get_config(arg)
    c.modes = "asft"
    # The 70B assistant is only sampled, once: its layers' weights decode as int8 (pl_dpo.models.quant), which
    # is what makes its sampler fit a v5e-16 (README, "Scaling"); its samples come from that approximation.
    assistant = model(preset="llama-3.1-70b", hf_path="", param_dtype="bfloat16", compute_dtype="bfloat16")
    assistant.sample_int8 = True
    # 128 rows a batch: the 70B assistant's int8 sampler fits a v5e-16 at 128, not at spin.py's 256 (the planner).
    c.sampling.batch_size = 128
    c.assistants = [
        ml_collections.ConfigDict(
            dict(
                sft_steps=0,
                batch_size=64,
                optim=optimizer(1e-5),
                tokenizer_path="",
                model=assistant,
            )
        )
    ]
    return c


def sweep() -> list[dict]:
    return [{"loss.T": t} for t in (0.01, 0.1, 1.0)]
