"""The built-in demo: SFT -> assistant -> SPIN and aSFT rounds on the synthetic task, CPU, minutes.

    python -m pl_dpo.main --config=configs/demo.py --workdir=runs/demo

A tiny Llama-style policy (~0.2M parameters) is fine-tuned on the built-in verifiable
tasks (addition, sorting, reversal); a larger assistant (~0.8M) is trained the same
way for longer. Then two self-play arms start from the same SFT policy: SPIN (K=2:
answer > own sample) and aSFT (K=3: answer > assistant sample > own sample), two
rounds each. The run ends with a table of held-out exact match (greedy decoding
checked by the task checker), answer log-likelihood, implicit-reward accuracy and
win rate against the SFT policy. Expected: both arms above the SFT row in exact
match and answer log-likelihood (see README for the measured numbers).

`get_config("quick")` is the shortened form used by the tests.
"""

import ml_collections


def optimizer(lr: float, warmup: int = 10, decay: str = "cosine") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, warmup_steps=warmup, decay=decay, final_lr_fraction=0.1, b1=0.9, b2=0.98,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0, grad_accum_steps=1, rms_decay=0.9))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.modes = "spin,asft"

    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=384))
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny-llama", hf_path="", param_dtype="float32", compute_dtype="float32", remat="none",
        overrides=dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=128)))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", files={}, skip_bad_rows=False, num_train=0,
        options=dict(seed=0, n_train=400 if quick else 2000, n_test=64 if quick else 300,
                     tasks=("add", "sort", "reverse"), min_difficulty=1, max_difficulty=3),
        max_prompt_len=40, max_response_len=16,
        # One sequence length (40 + 16) for every batch: at this size a recompile costs more than padding.
        length_buckets=(56,)))

    c.sft = ml_collections.ConfigDict(dict(steps=20 if quick else 300, batch_size=32, optim=optimizer(3e-3)))
    c.assistants = [ml_collections.ConfigDict(dict(
        sft_steps=30 if quick else 400, batch_size=32, optim=optimizer(3e-3),
        model=ml_collections.ConfigDict(dict(
            preset="tiny-llama", hf_path="", param_dtype="float32", compute_dtype="float32", remat="none",
            overrides=dict(hidden_size=96, intermediate_size=288, num_layers=3, num_heads=4, num_kv_heads=2,
                           head_dim=24, max_position_embeddings=128)))))]

    c.loss = ml_collections.ConfigDict(dict(K=0, T=5.0, variant="pl", top_m=0))
    c.rounds = ml_collections.ConfigDict(dict(
        num=1 if quick else 2, epochs=2, batch_size=32, max_steps=4 if quick else None,
        optim=optimizer(3e-4, warmup=5, decay="linear"), lr_per_round=()))
    c.sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16,
                                                batch_size=256))
    c.eval = ml_collections.ConfigDict(dict(num_prompts=0, batch_size=128))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=1))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=50))
    c.logprob_chunk = 64
    c.export_hf = False
    return c


def sweep() -> list[dict]:
    """K (SPIN vs aSFT) x T."""
    return [{"modes": m, "loss.T": t} for m in ("spin", "asft") for t in (0.01, 0.1, 1.0)]
