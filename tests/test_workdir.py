"""The workdir's owner: layout, committed steps, and the one stage table both the resume check and the sweep read."""

import json
import subprocess
import sys

import pytest

from pl_dpo.workdir import agreement
from pl_dpo.workdir import layout as wd


def test_layout():
    assert wd.policy_dir("/w", "spin", 2) == "/w/spin/policies/2"
    assert wd.eval_path("/w", "sft", 0) == "/w/sft/eval_0.json"
    assert wd.ranked_set_path("/w", "asft", 1) == "/w/asft/round_1/ranked.npz"
    assert wd.ranked_set_path("/w", "offline", 1, one_set=True) == "/w/offline/ranked.npz"
    assert wd.samples_path("/w", "assistant_0") == "/w/assistant_0/samples.npz"
    assert wd.export_dir("/w", "spin", 3) == "/w/spin/hf_export/round_3"


def test_one_stage_table_serves_the_resume_check_and_the_sweep():
    assert agreement.WORKDIR_KEYS == wd.identity_fields()
    for fields in wd.STAGE_FIELDS.values():
        assert set(fields) <= set(agreement.WORKDIR_KEYS)
    assert not set(wd.EVAL_FIELDS) & set(agreement.WORKDIR_KEYS)  # evaluation settings re-evaluate
    sys.path.insert(0, "experiments")
    import sweep

    assert set(sweep.STAGE_KEYS["sft"]) == set(wd.STAGE_FIELDS["sft"]) | {
        "eval",
        "sampling.max_new_tokens",
        *wd.NUMERICS_FIELDS,
    }


def test_step_committed(tmp_path):
    step = tmp_path / "policies" / "0"
    (step / "params").mkdir(parents=True)
    assert not wd.step_committed(step, ("params", "metadata"))  # no metadata: a killed save
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": None}))
    (step / "metadata").mkdir()
    assert not wd.step_committed(step, ("params", "metadata"))  # not committed
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": 12}))
    assert wd.step_committed(step, ("params", "metadata"))
    assert wd.policy_committed(str(tmp_path.parent), tmp_path.name, 0)


def test_workdir_layout_and_lock_import_no_jax():
    code = "import sys, pl_dpo.workdir.layout, pl_dpo.workdir.lock; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_hf_export_is_complete_or_absent(tmp_path, monkeypatch):
    """A run killed while exporting leaves no folder a resumed run would take as done (issue 23)."""
    import os
    import shutil
    from types import SimpleNamespace

    import pytest
    from transformers import AutoTokenizer

    from pl_dpo.models import create_model, preset_config
    from pl_dpo.selfplay import modes
    from pl_dpo.selfplay.rounds import SelfPlay
    from pl_dpo.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer")
    model = create_model(preset_config("tiny-llama", vocab_size=len(tokenizer)), seed=0)
    run = SimpleNamespace(workdir=str(tmp_path / "w"), tokenizer=tokenizer)
    out = tmp_path / "w" / "spin" / "hf_export" / "round_1"

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving the tokenizer")

    # Killed after the weights and config.json, before the tokenizer; a SIGKILL cleans nothing up.
    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "save_pretrained", killed)
        m.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
        with pytest.raises(RuntimeError, match="killed"):
            SelfPlay._export(run, modes.MODES["spin"], 1, model)
    assert not out.exists()
    # The resumed run exports it whole, and nothing else stays beside it.
    SelfPlay._export(run, modes.MODES["spin"], 1, model)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert AutoTokenizer.from_pretrained(out).encode("1 + 1") == tokenizer.encode("1 + 1")
    assert os.listdir(out.parent) == ["round_1"]
    # Done is done: a third call writes nothing.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    SelfPlay._export(run, modes.MODES["spin"], 1, model)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_run_imports_neither_torch_nor_autotokenizer_for_its_own_tokenizer_and_log(tmp_path):
    """torch (where installed) costs every run's process seconds; the metric log and pl_dpo's own tokenizer do
    not need it, and torch stays importable after."""
    pytest.importorskip("torch")
    probe = (
        "import sys, pl_dpo.tokenizer as t; from pl_dpo.workdir import metric_log; "
        f"t.build_tiny_tokenizer({str(tmp_path / 'tok')!r}, ['a b c'] * 8, vocab_size=300); "
        f"tok = t.load_tokenizer({str(tmp_path / 'tok')!r}); w = metric_log._summary_writer(); "
        "print(isinstance(tok, t.PreTrainedTokenizerFast), w.__name__, 'torch' in sys.modules); "
        "import torch; print(torch.ones(1).item())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "SummaryWriter", "False", "1.0"]
