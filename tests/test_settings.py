"""The config boundary's typed settings (config_lib.run_settings, config_lib.sampling), the one -1 mesh rule
(sharding.mesh_shape) and the stage seeds (selfplay.seeds)."""

import jax
import numpy as np
import pytest

from configs import common, demo
from pl_dpo import config_lib, sharding
from pl_dpo.data import PackedBatch, RankedBatch
from pl_dpo.selfplay import seeds


def test_run_settings_read_every_field_from_the_config():
    config = demo.get_config("quick")
    s = config_lib.run_settings(config)
    assert s.seed == config.seed and s.logprob_chunk == config.logprob_chunk
    assert s.tokenize.max_prompt_len == config.data.max_prompt_len
    assert s.seq_len == config.data.max_prompt_len + config.data.max_response_len
    assert s.eval_batch_size == config.eval.batch_size and s.sampling_batch_size == config.sampling.batch_size
    assert s.sft.steps == config.sft.steps and s.sft.patience == config.sft.patience
    assert s.rounds.epochs == config.rounds.epochs and s.rounds.optim.lr == config.rounds.optim.lr
    assert s.num_rounds == config.rounds.num and s.decode_tp is None  # 0: the sampler's rule
    # base() packs the K responses behind one prompt; the batch type says so.
    assert common.base().data.pack_prompt and s.batch_type is PackedBatch
    unpacked = config_lib.apply_overrides(config, {"data.pack_prompt": False, "rounds.max_steps": 0})
    assert config_lib.run_settings(unpacked).batch_type is RankedBatch
    assert config_lib.run_settings(unpacked).rounds.max_steps is None  # 0: all epochs


def test_optimizer_defaults_live_in_configs_common_only():
    optim = config_lib.optimizer(common.optimizer(1e-4))
    section = common.optimizer(1e-4)
    assert (optim.warmup_steps, optim.decay, optim.b2, optim.clip_norm) == (
        section.warmup_steps,
        section.decay,
        section.b2,
        section.clip_norm,
    )
    with pytest.raises(TypeError):  # no second set of defaults in the library
        type(optim)(lr=1e-4)


def test_lr_per_round_overrides_the_round_optimizer():
    config = config_lib.apply_overrides(demo.get_config("quick"), {"rounds.lr_per_round": (1e-3, 5e-4)})
    rounds = config_lib.run_settings(config).rounds
    assert [rounds.round_optim(t).lr for t in (0, 1)] == [1e-3, 5e-4]
    plain = config_lib.run_settings(demo.get_config("quick")).rounds
    assert plain.round_optim(1) == plain.optim  # no per-round rates: the section's optimizer


def test_sampling_section_as_the_samplers_config():
    config = demo.get_config("quick")
    cfg = config_lib.sampling(config.sampling, eos_ids=(2,), pad_id=0)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p) == (
        config.sampling.max_new_tokens,
        config.sampling.temperature,
        config.sampling.top_k,
        config.sampling.top_p,
    )
    assert cfg.eos_ids == (2,) and cfg.pad_id == 0


def test_mesh_shape_resolves_one_minus_one_axis():
    assert sharding.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    assert sharding.mesh_shape(2, 2, -1, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape(-1, -1, 1, 8)
    with pytest.raises(ValueError, match="do not divide the device count 8"):
        sharding.mesh_shape(3, -1, 1, 8)
    # The run's config check uses the same rule: a mesh that does not fit the devices is one config error.
    config = config_lib.apply_overrides(demo.get_config("quick"), {"mesh.data": 3, "mesh.num_devices": 0})
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh: .*do not divide the device count"):
        config_lib.validate(config, num_devices=8)
    assert jax.device_count() == 8  # conftest's simulated devices


def test_stage_seeds_depend_on_the_stage_only():
    assert seeds.stage_seed(0, "spin/round_0/prompts") == seeds.stage_seed(0, "spin", "round_0", "prompts")
    assert seeds.stage_seed(0, "spin/round_0/prompts") != seeds.stage_seed(0, "spin/round_1/prompts")
    assert seeds.stage_seed(1, "x") == seeds.stage_seed(0, "x") + 1
    assert len({seeds.round_seed(0, t) for t in range(5)}) == 5
    assert seeds.sft_seed(0, "sft") != seeds.sft_seed(0, "assistant_0") and 0 <= seeds.sft_seed(0, "sft") < 1000
    key = np.asarray(jax.random.key_data(seeds.stage_key(0, "spin/round_0/samples")))
    assert (key == np.asarray(jax.random.key_data(seeds.stage_key(0, "spin", "round_0", "samples")))).all()
    assert not (key == np.asarray(jax.random.key_data(seeds.stage_key(1, "spin/round_0/samples")))).all()
