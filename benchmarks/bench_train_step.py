"""Training-step throughput: pl_dpo's jitted step vs a TRL-style Hugging Face PyTorch step.

    python benchmarks/bench_train_step.py                       # CPU, small Llama shape
    python benchmarks/bench_train_step.py --hidden=512 --layers=8 --seq=512 --batch=4 --K=3

Both sides train the same model (pl_dpo's random init exported with `save_pretrained`
and loaded by `transformers.AutoModelForCausalLM`) on the same B prompts x K responses
of length L, with AdamW:

- pl_dpo: one forward of the policy over [B*K, L], chunked log-probs (no full logits),
  Plackett-Luce loss, reference log-probs precomputed (no reference weights held).
- Hugging Face, written the way TRL's DPO trainer does it: concatenated forward of the K
  responses, a frozen reference model's forward under no_grad, full float32
  log-softmax over the vocabulary, gather, Plackett-Luce loss (for K=2: -logsigmoid).

Tokens/s counts B*K*L tokens per step. Median of --repeats timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def bench_jax(model, batch, args) -> float:
    from pl_dpo import losses, sharding, train

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = train.OptimizerConfig(lr=1e-5, name="adamw", decay="constant").build(100)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
    loss_cfg = losses.LossConfig(T=0.1, variant="pl", top_m=0)
    step = train.make_train_step(
        graphdef, train.pl_dpo_objective(loss_cfg, args.chunk), tx, state_sh, sharding.batch_sharding(mesh)
    )
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        params, opt_state, metrics = step(state.params, state.opt_state, batch)
        jax.block_until_ready(metrics["loss"])
        state = train.TrainState(params, opt_state)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_torch(hf_dir, batch, args) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    B, K, L = batch.tokens_BxKxL.shape
    ids = torch.as_tensor(np.asarray(batch.tokens_BxKxL).reshape(B * K, L), dtype=torch.long)
    attn = torch.as_tensor(np.asarray(batch.attn_valid_BxKxL).reshape(B * K, L), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(batch.loss_mask_BxKxL).reshape(B * K, L)[:, 1:])

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * mask).sum(-1).view(B, K)

    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            ref = seq_logps(reference)
        s = 0.1 * (seq_logps(policy) - ref)
        lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
        loss = -(s - lse)[:, :-1].sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from pl_dpo.data import BatchIterator, assemble_ranked
    from pl_dpo.models import create_model, preset_config, save_pretrained

    heads = max(args.hidden // 64, 1)
    cfg = preset_config(
        "tiny-llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=max(heads // 2, 1),
        head_dim=args.hidden // heads,
        max_position_embeddings=max(args.seq, 128),
    )
    model = create_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompt_len = args.seq // 4
    prompts = [rng.integers(3, args.vocab, prompt_len).tolist() for _ in range(args.batch)]
    lists = [
        [rng.integers(3, args.vocab, args.seq - prompt_len).tolist() for _ in range(args.K)] for _ in range(args.batch)
    ]
    arrays = assemble_ranked(prompts, lists, pad_id=0, k=args.K, seq_len=args.seq)
    arrays["ref_logps_NxK"] = np.full((args.batch, args.K), -100.0, np.float32)
    batch = next(BatchIterator(arrays, batch_size=args.batch, shuffle=False, length_buckets=(args.seq,)))
    tokens = args.batch * args.K * args.seq
    n_params = sum(x.size for x in jax.tree.leaves(jax.tree.map(jnp.asarray, __import__("flax").nnx.state(model))))

    with tempfile.TemporaryDirectory() as hf_dir:
        save_pretrained(model, hf_dir)
        t_torch = bench_torch(hf_dir, batch, args)
    t_jax = bench_jax(model, batch, args)
    print(
        f"model: {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); "
        f"batch B={args.batch} x K={args.K} x L={args.seq} = {tokens} tokens; device {jax.devices()[0].device_kind}"
    )
    print("| implementation | step time (median) | tokens/s |")
    print("|---|---|---|")
    print(
        f"| Hugging Face PyTorch, TRL-style (reference forward, full logits) | {t_torch * 1e3:.0f} ms | "
        f"{tokens / t_torch:,.0f} |"
    )
    print(f"| pl_dpo (JAX, precomputed reference, chunked log-probs) | {t_jax * 1e3:.0f} ms | {tokens / t_jax:,.0f} |")
    print(f"speed-up: {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()
