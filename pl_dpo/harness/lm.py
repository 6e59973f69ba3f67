"""pl_dpo's model as an lm-evaluation-harness backend, registered as `pl_dpo` (the `eval` extra brings lm-eval).

    lm_eval --model pl_dpo --model_args path=<HF folder | a run's policy>[,peft=<PEFT folder>] --tasks <tasks> ...
    lm_eval.simple_evaluate(model=PlDpoLM(path=...), tasks=[...])   # or PlDpoLM(model=..., tokenizer=...)

Requests are read as lm-eval's own `hf` backend reads them (tokenization, BOS/EOS prefix, left truncation,
rolling windows, stop sequences, chat templates), and answered by pl_dpo's kernels (`harness.requests`).
"""

from __future__ import annotations

import json
from collections import defaultdict

import jinja2
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from pl_dpo import sampler, sharding
from pl_dpo.harness import requests as harness_requests
from pl_dpo.models import Decoder, lora, peft_io
from pl_dpo.models.hf_io import from_pretrained
from pl_dpo.selfplay import policies
from pl_dpo.tokenizer import load_tokenizer

DEFAULT_BATCH_SIZE = 8


def _batch_size(value) -> int:
    """lm-eval passes `--batch_size` through: an int, its string, or "auto" (here: the default)."""
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={value}: must be >= 1")
    return size


class NoChatTemplate(ValueError):
    """The chat template was asked for, and the tokenizer has none."""


@register_model("pl_dpo")
class PlDpoLM(TemplateLM):
    """A pl_dpo `Decoder` and its tokenizer, given as objects (a run's policy, in the run) or by `path`: a Hugging
    Face folder (weights, config and tokenizer) or a policy a run saved (`<workdir>/<lineage>/policies/<t>`, read
    with the run's config.json and tokenizer), in `dtype`."""

    def __init__(
        self,
        path: str | None = None,
        *,
        model: Decoder | None = None,
        tokenizer=None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = harness_requests.MAX_GEN_TOKS,
        dtype: str = "float32",
        seed: int = 0,
        add_bos_token: bool | None = None,
        share_contexts: bool = True,
        peft: str | None = None,
        **unused,  # lm-eval's device, max_batch_size: placement is the mesh's
    ):
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError(
                "PlDpoLM: give either path= (a Hugging Face folder or a run's policy) or model= and tokenizer="
            )
        if path is not None and policies.is_saved_policy(path):
            model, tokenizer = policies.saved_policy(path, dtype)
        elif path is not None:
            model = from_pretrained(path, param_dtype=dtype, compute_dtype=dtype)
            tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ValueError("PlDpoLM: model= needs its tokenizer=")
        if peft:  # a PEFT LoRA folder on top (as the hf backend's peft=): merged into the weights once
            kernel = model.layers.attn.q_proj.kernel[...]
            mesh = getattr(kernel.sharding, "mesh", None)
            placement = sharding.placement(mesh, sharding.DEFAULT_DECODER_RULES) if mesh is not None else None
            peft_io.load_peft_adapter(model, peft, placement)
            model = lora.merge(model)
        self.model, self.tokenizer = model, tokenizer
        self.path = path
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        # Multiple-choice continuations behind one copy of their context (`harness.shared_context`); False: one row
        # each, as lm-eval's hf backend (the benchmark's comparison). lm-eval passes model_args as strings.
        self.share_contexts = str(share_contexts).lower() not in ("0", "false")
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true")

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for (BOS, else EOS), as in the `hf` backend."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        # A string that already starts with the BOS text (a chat template wrote it) gets no second one.
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        def render(history):
            return self.tokenizer.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        if not self.tokenizer.chat_template:
            raise NoChatTemplate(
                f"--apply_chat_template: the tokenizer {self.tokenizer.name_or_path} has no chat template"
            )
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:  # templates without a system role (as the `hf` backend does)
            return render([m for m in chat_history if m["role"] != "system"])

    # ------------------------------------------------------------------ the three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        pairs = [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
        scores = harness_requests.continuation_scores(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            share_contexts=self.share_contexts,
        )
        for (key, _, _), answer in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored whole in windows of at most `max_length` tokens (lm-eval's rolling windows:
        every token predicted once, the first after the prefix token)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            rolling = lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((context, continuation))
                owner.append(i)
        scores = harness_requests.continuation_scores(
            self.model, windows, batch_size=self.batch_size, max_length=self.max_length
        )
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`, `temperature`, `top_p`, `top_k`) until a stop string, EOS or
        `max_gen_toks`; requests with the same generation settings are decoded together."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room in max_length={self.max_length}")
            greedy = not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) == 0.0
            settings = sampler.SamplingConfig(
                max_new_tokens=max_gen_toks,
                greedy=greedy,
                temperature=1.0 if greedy else float(kwargs["temperature"]),
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                top_k=int(kwargs.get("top_k", 0) or 0),
                eos_ids=(self.eot_token_id,),
                pad_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
            )
            prompts = [
                self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks) for i in members
            ]
            new_tokens = harness_requests.generate(
                self.model, prompts, settings, batch_size=self.batch_size, seed=self.seed
            )
            for i, tokens in zip(members, new_tokens, strict=True):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
