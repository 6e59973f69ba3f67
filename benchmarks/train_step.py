"""Training step: pl_dpo (plain and shared-prompt packed layouts) vs a TRL-style Hugging Face PyTorch DPO step.

All three train the same model (pl_dpo's random init, exported with `save_pretrained` and loaded by
`transformers.AutoModelForCausalLM`) on the same B prompts x K responses, with AdamW:

- pl_dpo: one forward of the policy, chunked log-probs (no [N, L, V] logits), the Plackett-Luce loss,
  reference log-probs precomputed with the round's data (no reference weights held). `plain` runs
  [B*K, P+R]; `packed` runs [B, P+K*R] with each response attending to the prompt and itself.
- Hugging Face, as TRL's DPO trainer does it: a concatenated forward of the K responses, a frozen
  reference model's forward under no_grad, a full float32 log-softmax over the vocabulary, gather,
  the Plackett-Luce loss.

`data_tokens_per_s` counts the B*K*(P+R) tokens of the lists (the same work for every variant), so it
is the throughput to compare; `model_tokens` counts what the model actually runs on (packing runs the
prompt once). MFU (GPU) is 6 x parameters x model tokens per second over the card's bf16 peak.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile

import jax
import numpy as np

from benchmarks.common import Profile, compiled_bytes, median_seconds, peaks, row
from configs import common
from pl_dpo import config_lib, losses, sharding
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, RankedSet, assemble_ranked
from pl_dpo.models import DecoderConfig, create_model, preset_config, save_pretrained
from pl_dpo.training import phase, train


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    lists: int  # B
    K: int
    prompt_len: int  # P
    response_len: int  # R
    model: str = "profile"  # "profile": the profile's model; "demo": the demo's policy (configs/demo.py)

    @property
    def data_tokens(self) -> int:
        return self.lists * self.K * (self.prompt_len + self.response_len)


def model_config(profile: Profile, workload: Workload) -> DecoderConfig:
    if workload.model == "demo":  # configs/demo.py's policy: tiny-llama (0.14M parameters), vocabulary 384
        return preset_config("tiny-llama", vocab_size=384, max_position_embeddings=128)
    if profile.gpu:  # Llama-3.2-1B shape (1.24B parameters, vocabulary 128256), random weights, bf16 compute
        return preset_config(
            "llama-3.2-1b", compute_dtype="bfloat16", param_dtype="float32", remat="full", attention_impl="cudnn"
        )
    if profile.name == "quick":
        return preset_config("tiny-llama", vocab_size=512, max_position_embeddings=256)
    # The 19.3M-parameter Llama shape of the CPU figures: hidden 256, 4 layers, vocabulary 32000.
    return preset_config(
        "tiny-llama",
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=680,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    )


def workloads(profile: Profile) -> list[Workload]:
    if profile.gpu:  # ~16k tokens per step
        return [
            Workload("1B, 16k tokens, K=2", 16, 2, 256, 256),
            Workload("1B, 15k tokens, K=3", 10, 3, 256, 256),
            Workload("1B, 16k tokens, K=4", 8, 4, 256, 256),
            Workload("1B, long prompt, K=3", 5, 3, 768, 256),
            Workload("1B, long prompt, K=4", 4, 4, 768, 256),
        ]
    if profile.name == "quick":
        return [Workload("tiny, K=3", 2, 3, 24, 8)]
    return [
        Workload("demo policy, K=3, P=40 R=16, 32 lists", 32, 3, 40, 16, model="demo"),
        Workload("19M, K=2, P=64 R=192", 4, 2, 64, 192),
        Workload("19M, K=3, P=64 R=192", 4, 3, 64, 192),
        Workload("19M, long prompt, K=3 (P=768 R=256)", 2, 3, 768, 256),
        Workload("19M, long prompt, K=4 (P=768 R=256)", 2, 4, 768, 256),
    ]


def ranked_arrays(w: Workload, vocab: int) -> RankedSet:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, w.prompt_len).tolist() for _ in range(w.lists)]
    lists = [[rng.integers(3, vocab, w.response_len).tolist() for _ in range(w.K)] for _ in range(w.lists)]
    ref = np.full((w.lists, w.K), -100.0, np.float32)
    return assemble_ranked(prompts, lists, pad_id=0, k=w.K, ref_logps=ref)


def jax_step(model, batch, profile: Profile) -> dict:
    """Median step time and compiled memory of pl_dpo's jitted step on one device."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = config_lib.optimizer(common.optimizer(1e-5, name="adamw")).build(100)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
    objective = train.pl_dpo_objective(losses.LossConfig(T=0.1, variant="pl", top_m=0), chunk_size=256)
    step = train.make_train_step(graphdef, objective, tx, state_sh, sharding.batch_sharding(mesh))
    batch = sharding.shard_batch(batch, mesh)
    memory = compiled_bytes(step.lower(state.params, state.opt_state, batch).compile())
    holder = {"state": state}

    def run():
        s = holder["state"]
        params, opt_state, metrics = step(s.params, s.opt_state, batch)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = train.TrainState(params, opt_state)

    seconds = median_seconds(run, profile)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return {"step_s": seconds, **memory, "peak_bytes": peak}


def torch_step(hf_dir: str, plain, profile: Profile) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)

    policy, reference = load(), load().eval()
    if device == "cuda":
        policy.gradient_checkpointing_enable()  # as TRL users run a 1B model at 16k tokens per step
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    B, K, L = plain.tokens_BxKxL.shape
    ids = torch.as_tensor(np.asarray(plain.tokens_BxKxL).reshape(B * K, L), dtype=torch.long, device=device)
    attn = torch.as_tensor(np.asarray(plain.attn_valid_BxKxL).reshape(B * K, L), dtype=torch.long, device=device)
    mask = torch.as_tensor(np.asarray(plain.loss_mask_BxKxL).reshape(B * K, L)[:, 1:], device=device)

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * mask).sum(-1).view(B, K)

    def run():
        with torch.no_grad():
            ref = seq_logps(reference)
        s = 0.1 * (seq_logps(policy) - ref)
        lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
        loss = -(s - lse)[:, :-1].sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(run, profile)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"step_s": seconds, "peak_bytes": peak}


def free_torch_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(profile: Profile, with_torch: bool = True) -> list[dict]:
    rows = []
    peak_flops = (peaks() or (None, None))[0]
    for w in workloads(profile):
        cfg = model_config(profile, w)
        n_params = cfg.num_params()
        arrays = ranked_arrays(w, cfg.vocab_size)
        kw = {"batch_size": w.lists, "shuffle": False}
        plain_len = (w.prompt_len + w.response_len,)
        plain = next(iter(BatchIterator(arrays, batch_type=RankedBatch, length_buckets=plain_len, **kw)))
        packed = next(iter(BatchIterator(arrays, batch_type=PackedBatch, **kw)))
        model_tokens = {
            "plain": phase.model_tokens(plain),
            "packed": phase.model_tokens(packed),
        }
        results = {}
        if with_torch:
            with tempfile.TemporaryDirectory() as hf_dir:
                save_pretrained(create_model(cfg, seed=0), hf_dir)
                results["Hugging Face (TRL-style)"] = torch_step(hf_dir, plain, profile)
            free_torch_memory()  # the torch models are gone: hand their memory back before JAX runs
            model_tokens["Hugging Face (TRL-style)"] = model_tokens["plain"]
        for name, batch in (("plain", plain), ("packed", packed)):
            try:
                figures = jax_step(create_model(cfg, seed=0), batch, profile)
            except Exception as e:  # cuDNN's fused attention refuses some masks / shapes
                if cfg.attention_impl != "cudnn":
                    raise
                print(f"[train_step] cudnn attention failed ({str(e)[:300]}); using xla", file=sys.stderr)
                cfg = dataclasses.replace(cfg, attention_impl="xla")
                figures = jax_step(create_model(cfg, seed=0), batch, profile)
            results[f"pl_dpo {name}"] = dict(figures, attention=cfg.attention_impl)
            model_tokens[f"pl_dpo {name}"] = model_tokens[name]
        baseline = "Hugging Face (TRL-style)" if with_torch else "pl_dpo plain"
        for variant, figures in results.items():
            tokens_per_s = model_tokens[variant] / figures["step_s"]
            mfu = 6 * n_params * tokens_per_s / peak_flops if peak_flops else None
            rows.append(
                row(
                    "train_step",
                    w.name,
                    variant,
                    baseline=None if variant == baseline else baseline,
                    data_tokens_per_s=w.data_tokens / figures["step_s"],
                    model_tokens=model_tokens[variant],
                    mfu=mfu,
                    params=n_params,
                    **figures,
                )
            )
        # Packing against the plain layout of the same run, whatever the baseline above.
        rows.append(
            row(
                "packing",
                w.name,
                "packed vs plain",
                speedup=results["pl_dpo plain"]["step_s"] / results["pl_dpo packed"]["step_s"],
                model_tokens_ratio=model_tokens["plain"] / model_tokens["packed"],
                temp_bytes_ratio=results["pl_dpo plain"]["temp_bytes"] / max(results["pl_dpo packed"]["temp_bytes"], 1),
            )
        )
    return rows
