"""Offline Plackett-Luce DPO on ranked lists from a dataset (UltraFeedback, K=4), fixed SFT reference.

    python -m pl_dpo.main --config=configs/offline.py --workdir=runs/offline \
        --config.model.hf_path=/data/zephyr-7b-sft-full \
        --config.data.files.train=/data/ultrafeedback/train.jsonl \
        --config.data.files.test=/data/ultrafeedback/test.jsonl

`:source=ranked_jsonl` reads the generic `{"prompt": ..., "responses": [best, ..., worst]}`
format instead; `:tiny` does too, with a tiny random model trained by SFT first, on CPU
(a local try-out: give it any small ranked JSONL file for train and test). Each prompt's
4 completions are ranked by `overall_score` (ties keep the source order:
data.options.ties). The reference is πθ(0), fixed for every round; nothing is generated.
`--config.loss.K=2` keeps the two best responses of each list. Expected: the held-out
implicit reward accuracy rises above 0.5 within the first epoch.
"""

import ml_collections

from configs.common import assistant, base, model, optimizer, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, tiny=False, source="ultrafeedback")
    tiny = arg.tiny
    source = "ranked_jsonl" if tiny else arg.source
    c = base(seed=0)
    c.modes = "offline"
    c.model = model(hf_path="", param_dtype="float32", compute_dtype="bfloat16", remat="dots")
    c.data.update(source=source, max_prompt_len=512, max_response_len=512, length_buckets=(256, 512, 1024))
    c.data.files = dict(train="", test="")
    c.data.options = dict(k=4, rating_field="overall_score", ties="stable") if source == "ultrafeedback" else {}
    c.loss.update(K=4, T=0.1)
    c.rounds.update(num=1, epochs=1, batch_size=32, optim=optimizer(5e-7, warmup=50, decay="cosine"))
    c.sampling.max_new_tokens = 256
    c.eval.update(num_prompts=500, batch_size=32)
    if tiny:
        # The tiny-llama preset (hidden 64, 2 layers, 4 heads): 0.14M parameters with this vocabulary.
        c.model = model(overrides=dict(max_position_embeddings=128))
        c.data.update(max_prompt_len=40, max_response_len=16, length_buckets=(56,))
        c.sft.update(steps=20, batch_size=16)
        c.rounds.update(batch_size=16, optim=optimizer(3e-4, warmup=2, decay="linear"))
        c.loss.update(K=3, T=1.0)
        c.sampling.update(max_new_tokens=16, batch_size=64)
        c.eval.update(num_prompts=0, batch_size=64)
        # Two small assistants, strongest first, so that `--config.modes=ladder` works on the same data.
        c.assistants = [assistant(hidden=96, layers=3, steps=30), assistant(hidden=80, layers=2, steps=20)]
        c.mesh.num_devices = 1
        c.logprob_chunk = 64
    return c


def sweep() -> list[dict]:
    """K (how much of each ranking is used) x T."""
    return [{"loss.K": k, "loss.T": t} for k in (2, 3, 4) for t in (0.01, 0.1, 1.0)]
