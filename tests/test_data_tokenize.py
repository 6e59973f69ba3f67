"""Tokenisation with the real tiny BPE tokenizer: exact boundary, masks, truncation counts."""

import numpy as np
import pytest

from pl_dpo.data import Example, TokenizeConfig, assemble_ranked, tokenize_examples, trim_at_eos
from pl_dpo.data.synthetic import SyntheticConfig, generate_examples
from pl_dpo.data.tokenize import encode_examples, prompt_text
from pl_dpo.tokenizer import build_tiny_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_plain")
    build_tiny_tokenizer(d)
    t = load_tokenizer(d)
    t.chat_template = None
    return t


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_layout_and_mask_convention(tok):
    ex = [Example("e0", "What is 12 + 30?", ("42", "41 or so")), Example("e1", "Sort: 312", ("123",))]
    cfg = TokenizeConfig(max_prompt_len=20, max_response_len=8)
    arrays, stats = tokenize_examples(tok, ex, cfg)
    assert arrays.tokens_NxKxL.shape == (2, 2, 28) and arrays.tokens_NxKxL.dtype == np.int32
    assert arrays.valid_NxK.tolist() == [[True, True], [True, False]]
    assert stats.boundary_merges == 0 and stats.prompts_truncated == 0 and stats.responses_truncated == 0
    for n, e in enumerate(ex):
        ptxt = tok.apply_chat_template(
            [{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True
        )
        pids = _ids(tok, ptxt)
        for k, r in enumerate(e.responses):
            row, mask, attn = (
                getattr(arrays, key)[n, k] for key in ("tokens_NxKxL", "loss_mask_NxKxL", "attn_valid_NxKxL")
            )
            full = _ids(tok, ptxt + r) + [tok.eos_token_id]
            assert row[: len(full)].tolist() == full  # Exactly the tokenisation of the whole text.
            assert (row[len(full) :] == tok.pad_token_id).all() and attn.sum() == len(full)
            # mask[i] True <=> token i is a response token; never at i=0; EOS included.
            assert not mask[: len(pids)].any() and mask[len(pids) : len(full)].all() and not mask[len(full) :].any()
            assert tok.decode(row[mask]) == r + tok.eos_token
        # Prompt-only view: left padded, ends where the response starts.
        pv = arrays.prompt_valid_NxP[n]
        assert arrays.prompt_tokens_NxP[n][pv].tolist() == pids and pv[-1] and pv.sum() == len(pids)
        assert not pv[: 20 - len(pids)].any()


def test_boundary_merge_is_handled_and_counted(tok, plain_tok):
    # "What" is one token but the raw prompt ends inside it: the merge crosses the boundary.
    ex = [Example("m", "The answer is Wh", ("at 5",)), Example("ok", "The answer is", (" 7",))]
    cfg = TokenizeConfig(max_prompt_len=16, max_response_len=8, prompt_template="raw")
    prompts, responses, stats = encode_examples(tok, ex, cfg)
    assert _ids(tok, "The answer is What 5")[: len(prompts[0])] != prompts[0]  # Really crosses.
    assert stats.boundary_merges == 1
    assert prompts[0] == _ids(tok, "The answer is Wh")
    assert responses[0][0] == _ids(tok, "at 5") + [tok.eos_token_id]
    assert responses[1][0] == _ids(tok, "The answer is 7")[len(prompts[1]) :] + [tok.eos_token_id]
    # No chat template: "auto" falls back to the plain template with BOS.
    assert prompt_text(plain_tok, "hi", TokenizeConfig()) == "<|bos|>User: hi\nAssistant:\n"
    assert prompt_text(tok, "hi", TokenizeConfig(system_prompt="Be brief.")).startswith("<|bos|><|system|>Be brief.")
    with pytest.raises(ValueError, match="no chat template"):
        prompt_text(plain_tok, "hi", TokenizeConfig(prompt_template="chat"))
    _, _, s = encode_examples(plain_tok, generate_examples(SyntheticConfig(n_train=30, n_test=0))["train"], cfg)
    assert s.boundary_merges == 0


def test_truncation_policies_and_counts(tok):
    long_prompt = "Reverse: " + " ".join("abcdefghijklmnop")
    ex = [Example("a", long_prompt, ("a b c d e f g h i j", "x")), Example("b", "Sort: 21", ("12",))]
    cfg = TokenizeConfig(max_prompt_len=10, max_response_len=4)
    prompts, responses, stats = encode_examples(tok, ex, cfg)
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 1 and stats.responses == 3
    full_prompt = _ids(tok, prompt_text(tok, long_prompt, cfg))
    assert prompts[0] == [tok.bos_token_id] + full_prompt[-9:]  # Keeps BOS and the END.
    assert tok.convert_ids_to_tokens(prompts[0][-2:]) == ["<|eos|>", "<|assistant|>"]
    assert (
        responses[0][0] == _ids(tok, prompt_text(tok, long_prompt, cfg) + "a b c d e f g h i j")[len(full_prompt) :][:4]
    )
    assert responses[0][1][-1] == tok.eos_token_id and responses[1][0][-1] == tok.eos_token_id
    assert stats.prompt_lens[0] == len(full_prompt) and stats.summary()["k_distribution"] == {1: 1, 2: 1}
    with pytest.raises(ValueError, match=r"example 0 \(id 'a'\): prompt has \d+ tokens > max_prompt_len=10"):
        encode_examples(tok, ex, TokenizeConfig(max_prompt_len=10, max_response_len=4, prompt_truncation="error"))
    with pytest.raises(ValueError, match=r"example 0 \(id 'a'\) response 0: response has 11 tokens"):
        encode_examples(tok, ex, TokenizeConfig(max_prompt_len=32, max_response_len=4, response_truncation="error"))
    with pytest.raises(ValueError, match="prompt_template"):
        TokenizeConfig(prompt_template="fancy").validate()


def test_synthetic_fits_budget(tok):
    exs = generate_examples(SyntheticConfig(n_train=300, n_test=0, max_difficulty=8))["train"]
    _, _, stats = encode_examples(tok, exs, TokenizeConfig(max_prompt_len=26, max_response_len=10))
    assert stats.prompts_truncated == 0 and stats.responses_truncated == 0 and stats.boundary_merges == 0
    exs = generate_examples(SyntheticConfig(n_train=300, n_test=0))["train"]  # Default difficulty.
    _, _, stats = encode_examples(tok, exs, TokenizeConfig())
    assert max(stats.prompt_lens) <= 16 and max(stats.response_lens) <= 5


def test_assemble_ranked_and_trim():
    arrays = assemble_ranked(
        [[1, 5], [1, 6, 7]],
        [[[8, 2], [9, 9, 2]], [[3]]],
        pad_id=0,
        k=3,
        ref_logps=np.zeros((2, 3)),
        example_ids=[10, 11],
    )
    assert arrays.tokens_NxKxL.shape == (2, 3, 5)
    assert arrays.tokens_NxKxL[0, 1].tolist() == [1, 5, 9, 9, 2]
    assert arrays.loss_mask_NxKxL[1, 0].tolist() == [False, False, False, True, False]
    assert arrays.valid_NxK.tolist() == [[True, True, False], [True, False, False]]
    # A missing response holds the prompt alone: attended to, never in the loss.
    assert arrays.tokens_NxKxL[1, 2].tolist() == [1, 6, 7, 0, 0]
    assert arrays.attn_valid_NxKxL[1, 2].tolist() == [True, True, True, False, False]
    assert not arrays.loss_mask_NxKxL[~arrays.valid_NxK].any()
    with pytest.raises(ValueError, match="empty prompt"):
        assemble_ranked([[]], [[[2]]], pad_id=0)
    assert arrays.prompt_tokens_NxP.tolist() == [[0, 1, 5], [1, 6, 7]]
    assert arrays.example_ids_N.tolist() == [10, 11] and arrays.ref_logps_NxK.dtype == np.float32
    with pytest.raises(ValueError, match="need L>=5"):
        assemble_ranked([[1, 5]], [[[8, 2, 2]]], pad_id=0, seq_len=4)
    with pytest.raises(ValueError, match="empty"):
        assemble_ranked([[1]], [[[]]], pad_id=0)
    with pytest.raises(ValueError, match="ref_logps shape"):
        assemble_ranked([[1]], [[[2]]], pad_id=0, ref_logps=np.zeros((1, 2)))
    assert trim_at_eos([4, 5, 2, 7, 2], eos_id=2) == [4, 5, 2] and trim_at_eos([4, 5], eos_id=2) == [4, 5]
