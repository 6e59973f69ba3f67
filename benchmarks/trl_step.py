"""One DPO training step: pl_dpo (plain and packed layouts) against TRL's own `DPOTrainer`, the real library.

Both sides train the same Hugging Face folder (SmolLM2-135M-Instruct, pl_dpo/models/smollm2.py; the `quick`
profile a tiny random model with the tiny tokenizer) on the same 8 (prompt, chosen, rejected) text pairs a step,
with AdamW at 1e-5, gradient clipping at 1.0, beta = 0.1, and reference log-probs computed before training:

- TRL: `trl.DPOTrainer` with `precompute_ref_log_probs=True` (the reference pass runs in the constructor and is
  not timed), the sigmoid DPO loss, `per_device_train_batch_size=8`, no gradient accumulation. A
  `TrainerCallback` times each optimizer step from `on_step_begin` to `on_step_end`: forward, backward, clipping,
  AdamW, TRL's metrics, but not the data loader's collation, which runs before `on_step_begin`.
- pl_dpo: `benchmarks.train_step.jax_step` (the jitted step of `pl_dpo.training.train`) on the model loaded by
  `pl_dpo.models.from_pretrained`, with the Plackett-Luce loss, which for K = 2 is DPO's sigmoid loss. The pairs
  are tokenized as TRL does (prompt, then prompt + response + EOS; the response starts where the two diverge), so
  both see the same token ids; the reference log-probs are TRL's precomputed ones. `plain` runs the 16 rows
  [prompt, response]; `packed` runs 8 rows [prompt, chosen, rejected] (the prompt once).

Like for like: TRL's gradient checkpointing (on by default in `DPOConfig`) is turned off, as pl_dpo's step does
not rematerialize; CPU runs in float32 on both sides; the GPU in bf16 compute with float32 weights on both sides
(TRL's default `bf16=True` autocast, pl_dpo's `compute_dtype="bfloat16"`). The figure is the median step time
after the warm-up steps (TRL's first steps include its lazy set-up, pl_dpo's warm-up the compilation).
`model_tokens` counts the real tokens the model runs on (TRL's and `plain` are the same rows).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import Profile, row
from benchmarks.train_step import free_torch_memory, jax_step
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, assemble_ranked
from pl_dpo.training import phase

PAIRS = 8  # preference pairs per step
BETA = 0.1
LEARNING_RATE = 1e-5
TRL = "TRL DPOTrainer"

# The words of the `prose` cases' random text.
WORDS = (
    "the model reads a short story about river stone light garden window friend morning city music paper "
    "quiet green small old new bright cold warm runs walks finds keeps opens brings under over near after "
    "before because while every other some many answer question number letter simple careful"
).split()


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "arithmetic": "What is a + b?"; "prose": random words
    prompt_words: int = 0
    response_words: int = 0


def cases(profile: Profile) -> list[Case]:
    if profile.name == "quick":
        return [Case("tiny, 8 arithmetic pairs", "arithmetic"), Case("tiny, 8 prose pairs", "prose", 12, 12)]
    arithmetic = Case("SmolLM2-135M, 8 arithmetic pairs", "arithmetic")
    if profile.gpu:
        return [arithmetic, Case("SmolLM2-135M, 8 prose pairs, 256 + 256 words", "prose", 256, 256)]
    return [arithmetic]  # CPU: a longer case takes minutes a step on 2 cores


def text_pairs(case: Case) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) strings, the same for every run."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(PAIRS):
        if case.kind == "arithmetic":  # chosen: the bare sum; rejected: a longer, wrong sentence
            a, b = (int(x) for x in rng.integers(10, 1000, 2))
            wrong = a + b + int(rng.integers(1, 10))
            out.append((f"What is {a} + {b}?", f" {a + b}", f" I think that the answer is {wrong}, but I am not sure."))
        else:
            words = [
                " ".join(rng.choice(WORDS, n)) for n in (case.prompt_words, case.response_words, case.response_words)
            ]
            out.append((words[0], " " + words[1], " " + words[2]))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str, str]]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """TRL's tokenization of non-conversational pairs (DPOTrainer._prepare_dataset): EOS appended to each
    response, prompt and prompt + response tokenized, the response starting where they diverge."""
    eos = tokenizer.eos_token
    prompts, lists = [], []
    for prompt, chosen, rejected in pairs:
        p = tokenizer(prompt)["input_ids"]
        wholes = [tokenizer(prompt + (r if r.endswith(eos) else r + eos))["input_ids"] for r in (chosen, rejected)]
        n = min(_common_prefix(p, w) for w in wholes)
        prompts.append(p[:n])
        lists.append([w[n:] for w in wholes])
    return prompts, lists


def model_folder(profile: Profile, folder: str) -> str:
    """SmolLM2-135M-Instruct (cpu, gpu), or a tiny random model with the tiny tokenizer written to `folder`."""
    if profile.name != "quick":
        from pl_dpo.models.smollm2 import smollm2_folder

        return smollm2_folder()
    from pl_dpo.models import create_model, preset_config, save_pretrained
    from pl_dpo.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(folder, vocab_size=384)
    save_pretrained(
        create_model(preset_config("tiny-llama", vocab_size=384, max_position_embeddings=256), seed=0), folder
    )
    return folder


def trl_step(folder: str, pairs: list[tuple[str, str, str]], profile: Profile) -> tuple[dict, np.ndarray]:
    """Median optimizer-step time of TRL's DPOTrainer, and its precomputed reference log-probs [PAIRS, 2]."""
    import datasets
    import torch
    import transformers
    import trl

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else lambda: None

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)

    # `gradient_checkpointing` became `activation_checkpointing` in transformers 5.x (the old name warns).
    fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # TRL's dataset preparation would draw a bar per `map`
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            config = trl.DPOConfig(
                output_dir=out_dir,
                per_device_train_batch_size=PAIRS,
                gradient_accumulation_steps=1,
                max_steps=profile.warmup + profile.repeats,
                learning_rate=LEARNING_RATE,
                beta=BETA,
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=PAIRS,
                max_length=None,
                **{checkpointing: False},
                bf16=gpu,
                fp16=False,
                use_cpu=not gpu,
                logging_strategy="no",
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                disable_tqdm=True,
                dataloader_num_workers=0,
                dataloader_pin_memory=gpu,
                seed=0,
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            prompt, chosen, rejected = (list(column) for column in zip(*pairs))
            data = datasets.Dataset.from_dict({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            timer = StepTimer()
            trainer = trl.DPOTrainer(
                model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
            )
            trainer.remove_callback(transformers.PrinterCallback)  # prints the end-of-training metrics to stdout
            # Precomputed in the constructor, in the dataset's order (no shuffling).
            ref = np.stack(
                [np.asarray(trainer.train_dataset[c], np.float32) for c in ("ref_chosen_logps", "ref_rejected_logps")],
                axis=1,
            )
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() if gpu else None
            del trainer, model
    finally:
        if bars:
            datasets.enable_progress_bars()
    gc.collect()
    free_torch_memory()  # hand the card back before JAX runs
    if len(timer.times) != profile.warmup + profile.repeats:
        raise RuntimeError(f"TRL ran {len(timer.times)} steps, expected {profile.warmup + profile.repeats}")
    return {"step_s": statistics.median(timer.times[profile.warmup :]), "peak_bytes": peak}, ref


def run(profile: Profile, with_torch: bool = True) -> list[dict]:
    from transformers import AutoTokenizer

    from pl_dpo.models import from_pretrained

    if with_torch:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl not installed: the TRL DPOTrainer baseline is skipped", file=sys.stderr)
            with_torch = False
    compute_dtype = "bfloat16" if profile.gpu else "float32"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(profile, tmp)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for case in cases(profile):
            pairs = text_pairs(case)
            results, tokens = {}, {}
            ref = np.zeros((PAIRS, 2), np.float32)
            if with_torch:
                results[TRL], ref = trl_step(folder, pairs, profile)
            prompts, lists = tokenize_pairs(tokenizer, pairs)
            arrays = assemble_ranked(prompts, lists, pad_id=pad_id, k=2, ref_logps=ref)
            kw = {"batch_size": PAIRS, "shuffle": False}
            plain_len = (arrays.tokens_NxKxL.shape[-1],)
            batches = {
                "pl_dpo plain": next(
                    iter(BatchIterator(arrays, batch_type=RankedBatch, length_buckets=plain_len, **kw))
                ),
                "pl_dpo packed": next(iter(BatchIterator(arrays, batch_type=PackedBatch, **kw))),
            }
            for name, batch in batches.items():
                model = from_pretrained(folder, param_dtype="float32", compute_dtype=compute_dtype)
                results[name] = jax_step(model, batch, profile)
                tokens[name] = phase.model_tokens(batch)
            tokens[TRL] = tokens["pl_dpo plain"]
            baseline = TRL if with_torch else "pl_dpo plain"
            for variant, figures in results.items():
                rows.append(
                    row("trl_step", case.name, variant, baseline=None if variant == baseline else baseline,
                        pairs_per_s=PAIRS / figures["step_s"], model_tokens=tokens[variant],
                        compute_dtype=compute_dtype, **figures)
                )  # fmt: skip
    return rows
