"""pl_dpo.selfplay.policies.PolicyStore on a 2x2x2 mesh of the 8 simulated CPU devices: a preset's πθ(0)
born sharded by the rules, a Hugging Face folder's likewise, and save -> saved -> restore bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.common import model as model_section
from pl_dpo import sharding
from pl_dpo.models import save_pretrained
from pl_dpo.selfplay.policies import PolicyStore

VOCAB = 32
# A tiny-llama small enough to compile at once; every sharded dimension divides by 2.
MODEL = model_section(overrides=dict(hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=64))


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture
def store(tmp_path, mesh):
    return PolicyStore(str(tmp_path), mesh, sharding.DEFAULT_DECODER_RULES, VOCAB)


@pytest.fixture(scope="module")
def initial(mesh, tmp_path_factory):
    store = PolicyStore(str(tmp_path_factory.mktemp("initial")), mesh, sharding.DEFAULT_DECODER_RULES, VOCAB)
    return store.initial(MODEL, seed=0)


def _leaves(model) -> dict[str, jax.Array]:
    return {sharding.path_to_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def _assert_same(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for name in la:
        assert la[name].dtype == lb[name].dtype, name
        assert la[name].sharding.is_equivalent_to(lb[name].sharding, la[name].ndim), name
        np.testing.assert_array_equal(np.asarray(la[name]), np.asarray(lb[name]), err_msg=name)


def test_initial_preset_is_born_sharded_by_the_rules(initial, mesh):
    leaves = _leaves(initial)
    expected = {  # the rules of DEFAULT_DECODER_RULES; stacked layers keep their first axis whole
        "embed/embedding": P("tensor", "fsdp"),
        "layers/attn/q_proj/kernel": P(None, "fsdp", "tensor"),
        "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
        "lm_head/kernel": P("fsdp", "tensor"),
        "final_norm/scale": P(),
    }
    assert expected.keys() <= leaves.keys()
    for name, spec in expected.items():
        arr = leaves[name]
        assert arr.sharding.mesh.shape == mesh.shape, name
        assert arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), arr.ndim), (name, arr.sharding)
        assert len(arr.addressable_shards) == 8
    # Never whole on one device: a [V, D] embedding is held as V/2 x D/2 pieces.
    emb = leaves["embed/embedding"]
    assert emb.shape == (VOCAB, 32) and emb.addressable_shards[0].data.shape == (VOCAB // 2, 16)
    # Every leaf follows the rules (the same shardings `abstract` gives a restore).
    _, target = PolicyStore("unused", mesh, sharding.DEFAULT_DECODER_RULES, VOCAB).abstract(MODEL)
    targets = {sharding.path_to_str(p): t for p, t in jax.tree_util.tree_leaves_with_path(target)}
    assert targets.keys() == leaves.keys()
    for name, arr in leaves.items():
        assert arr.shape == targets[name].shape and arr.dtype == targets[name].dtype, name
        assert arr.sharding.is_equivalent_to(targets[name].sharding, arr.ndim), name


def test_save_then_restore_is_bit_identical(initial, store):
    assert not store.saved("spin", 1)
    store.save("spin", 1, initial, {"round": 1})
    assert store.saved("spin", 1)
    assert not store.saved("spin", 0) and not store.saved("asft", 1)  # per lineage, per index
    restored = store.restore("spin", MODEL, 1)
    _assert_same(restored, initial)
    with pytest.raises(FileExistsError):  # a saved policy is never overwritten
        store.save("spin", 1, restored, {"round": 1})
    with pytest.raises(FileNotFoundError):
        store.restore("spin", MODEL, 2)


def test_initial_from_a_hugging_face_folder_is_sharded_and_exact(initial, store, tmp_path):
    folder = tmp_path / "hf"
    save_pretrained(initial, str(folder))
    hf = model_section(hf_path=str(folder))
    loaded = store.initial(hf, seed=123)  # the seed does not matter: the weights are the folder's
    _assert_same(loaded, initial)


def test_a_saved_policy_is_read_back_with_its_runs_config_and_tokenizer(tmp_path, mesh):
    from configs import demo
    from pl_dpo.selfplay import policies
    from pl_dpo.selfplay.run_data import run_tokenizer
    from pl_dpo.workdir import agreement, layout

    config = demo.get_config("quick")  # the policy and two assistants of other widths
    workdir = str(tmp_path / "run")
    agreement.check_workdir_config(workdir, config, ())  # config.json as a run writes it (assistants as YAML)
    tokenizer = run_tokenizer(config, workdir)
    store = PolicyStore(workdir, mesh, sharding.DEFAULT_DECODER_RULES, len(tokenizer))
    saved = {}
    for lineage, section in (("spin", config.model), ("assistant_1", config.assistants[1].model)):
        saved[lineage] = store.initial(section, seed=3)
        store.save(lineage, 2, saved[lineage], {"lineage": lineage})
    for lineage, model in saved.items():
        again, its_tokenizer = policies.saved_policy(layout.policy_dir(workdir, lineage, 2), mesh=mesh)
        _assert_same(again, model)
        assert len(its_tokenizer) == len(tokenizer)
    with pytest.raises(policies.SavedPolicyError, match=r"spin/policies/5: no saved policy 5 of spin \(saved: 2\)"):
        policies.saved_policy(layout.policy_dir(workdir, "spin", 5), mesh=mesh)
    with pytest.raises(policies.SavedPolicyError, match="not a run's policy folder"):
        policies.saved_policy(str(tmp_path / "run" / "spin" / "policies" / "last"))
