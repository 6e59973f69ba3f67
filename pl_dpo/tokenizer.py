"""A tiny local byte-level BPE tokenizer, and loading tokenizers from local folders.

Nothing here downloads anything. `build_tiny_tokenizer` trains a small BPE on a
corpus (by default the phrases of the built-in synthetic tasks) with the
`tokenizers` library and saves it as a Hugging Face tokenizer folder, so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it like any model's.

Design choices (why):
- Digits are split one per token (`Digits(individual_digits=True)`), as Llama-3
  and Qwen do, so that arithmetic tasks see one digit per position whatever
  merges the BPE learned.
- Byte-level, so any text (UltraChat, UltraFeedback fixtures) round-trips.
- Chat template: `<|bos|>` then each turn as `<|role|>content<|eos|>`; with
  `add_generation_prompt` it ends in `<|assistant|>`. A response is therefore
  "content + <|eos|>", exactly what the data pipeline appends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS  # PAD first so pad_token_id == 0.

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Phrases shared with pl_dpo.data.synthetic's prompt formats, so that they merge
# into few tokens. Kept literal here to avoid a tokenizer -> data import cycle.
_TASK_PHRASES = (
    "What is ",
    "Add: ",
    "Sort: ",
    "Reverse: ",
    "Sort the digits: ",
    "Reverse the letters: ",
    "The answer is ",
    "Answer: ",
    " + ",
    " = ",
    "?",
    ".",
    ",",
)


def default_corpus() -> Iterator[str]:
    """Deterministic corpus: task phrases, digits, letters, a little English."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(20):  # Repeat phrases so their merges win over letter pairs.
        yield from _TASK_PHRASES
    yield " ".join("0123456789")
    yield " ".join(letters)
    yield " ".join(letters.upper())
    for i in range(0, 1000, 7):
        yield f"What is {i} + {(i * 37) % 1000}?"
        yield "Sort: " + " ".join(str((i * k) % 10) for k in range(1, 7))
        yield "Reverse: " + " ".join(letters[(i * k) % 26] for k in range(1, 7))
    yield (
        "You are a helpful assistant. Please answer the question below. "
        "The quick brown fox jumps over the lazy dog. Thank you!"
    )


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `corpus` and saves it to `out_dir`.

    Deterministic: the same corpus and vocab_size give the same files.
    vocab_size is an upper bound: a small corpus learns fewer merges (the default
    corpus gives 328 ids), so size models by `len(tokenizer)`. The
    returned tokenizer (and `AutoTokenizer.from_pretrained(out_dir)`) has
    bos/eos/pad set, the role markers as special tokens and a chat template.
    """
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet + specials ({n_base}).")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A list (not a generator) keeps training single-pass and order-deterministic.
    texts = list(default_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("build_tiny_tokenizer: the corpus is empty.")
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        model_max_length=1 << 20,
    )
    hf.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


# What AutoTokenizer loads as PreTrainedTokenizerFast (transformers 5 names it TokenizersBackend): a tokenizer.json.
_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _tokenizer_class(path: str) -> str | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None  # AutoTokenizer says what is wrong


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local folder (never remote code, never a download).

    Sets the pad token to EOS when the tokenizer has none (as is usual for Llama
    style models); padding positions are masked anyway, so the id only matters
    for being a valid index.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Tokenizer folder not found: {path!r}")
    files = set(os.listdir(path))
    if not files & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        raise FileNotFoundError(
            f"{path!r} holds no tokenizer files (tokenizer.json / tokenizer_config.json); found {sorted(files)}"
        )
    if _tokenizer_class(path) in _FAST_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        # Imported here: AutoTokenizer brings transformers' model configs, and with them torch where it is
        # installed (2 s of every process), which a tokenizer.json-only tokenizer (pl_dpo's own) never needs.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"Tokenizer at {path!r} has neither a pad nor an eos token; set one.")
        tok.pad_token = tok.eos_token
    return tok
