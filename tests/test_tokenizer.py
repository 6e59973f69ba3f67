"""Tiny local tokenizer: builds offline, deterministic, loads through AutoTokenizer."""

import filecmp
import os

import pytest
from transformers import AutoTokenizer

from pl_dpo.tokenizer import EOS, build_tiny_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return d


def test_loads_with_auto_tokenizer_and_specials(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 0
    assert tok.bos_token == "<|bos|>" and tok.eos_token == EOS
    for role in ("<|user|>", "<|assistant|>", "<|system|>"):
        ids = tok(role, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, role  # Role markers are single special tokens.
    assert len(tok) <= 512


def test_chat_template_and_roundtrip(tok_dir):
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "user", "content": "What is 123 + 45?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>What is 123 + 45?<|eos|><|assistant|>"
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|bos|><|user|>What is 123 + 45?<|eos|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Digits are one token each, so arithmetic sees one digit per position.
    pieces = tok.convert_ids_to_tokens(tok("9876", add_special_tokens=False)["input_ids"])
    assert pieces == ["9", "8", "7", "6"]
    # Byte-level: arbitrary unicode round-trips.
    s = "Grüße, 世界! \t\n"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    # The task prompts stay short.
    assert len(ids) <= 16


def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_tokenizer(a)
    build_tiny_tokenizer(b)
    assert filecmp.cmp(a / "tokenizer.json", b / "tokenizer.json", shallow=False)


def test_custom_corpus_and_errors(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "c", corpus=["hello world"] * 10, vocab_size=300)
    assert len(tok) <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(tmp_path / "d", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
