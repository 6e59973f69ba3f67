"""The workdir's owner: layout, committed steps, and the one stage table both the resume check and the sweep read."""

import json
import subprocess
import sys

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
