"""The planner (`python -m pl_dpo.plan`): slices, presets, time bounds, and its figures from the real TPU compiler.

Compiles for v5e slices with libtpu (the `tpu` extra) on this CPU machine; small shapes keep it fast."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import pytest

pytest.importorskip("libtpu", reason="the TPU compiler comes with the `tpu` extra: pip install -e '.[tpu]'")

from configs import common  # noqa: E402
from pl_dpo import (  # noqa: E402
    config_lib,  # noqa: E402
    losses,
    sampler,
    sharding,
)
from pl_dpo.models import preset_config  # noqa: E402
from pl_dpo.plan import advice, bounds, cli, compiler, programs, slices  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from pl_dpo.training import train  # noqa: E402


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- tables, no compiler


@pytest.mark.parametrize(
    "name, chips, kind",
    [
        ("v4-8", 4, "TPU v4"),
        ("v4-64", 32, "TPU v4"),
        ("v5litepod-4", 4, "TPU v5 lite"),
        ("v5e-16", 16, "TPU v5 lite"),
        ("v5litepod-64", 64, "TPU v5 lite"),
        ("v5p-8", 4, "TPU v5"),
        ("v5p-64", 32, "TPU v5"),
        ("v6e-4", 4, "TPU v6 lite"),
        ("v6e-64", 64, "TPU v6 lite"),
    ],
)
def test_cloud_tpu_names_give_the_compilers_devices(name, chips, kind):
    s = slices.get_slice(name)
    devices = slices.abstract_devices(s)
    assert s.num_chips == chips == len(devices)
    assert {d.device_kind for d in devices} == {kind} == {s.chip.device_kind}


def test_every_generation_covers_the_issues_range():
    for gen, sizes in {"v4": (8, 16, 32, 64), "v5p": (8, 16, 32, 64), "v6e": (4, 8, 16, 32, 64)}.items():
        for n in sizes:
            assert f"{gen}-{n}" in slices.SLICES
    for n in (4, 8, 16, 32, 64):
        assert slices.get_slice(f"v5e-{n}").name == f"v5litepod-{n}"


def test_presets_have_the_published_parameter_counts():
    # Counts from the models' own safetensors indexes / model cards.
    published = {
        "mistral-7b": 7_241_732_096,
        "llama-2-7b": 6_738_415_616,
        "llama-2-13b": 13_015_864_320,
        "llama-3.1-8b": 8_030_261_248,
        "qwen2-7b": 7_615_616_512,
    }
    for name, count in published.items():
        assert preset_config(name).num_params() == pytest.approx(count, rel=2e-4), name


def test_decode_bound_is_the_weight_and_cache_read():
    cfg = preset_config("llama-2-7b", compute_dtype="bfloat16")
    s = slices.get_slice("v5p-8")
    p = programs.Program("sampler", "sample", cfg, batch=1, prompt_len=16, new_tokens=16)
    seconds, unit, by = bounds.time_bound(p, s, (1, -1, 1))
    # Batch 1: reading each chip's quarter of the bf16 weights dominates (plus a tiny KV cache).
    weights = 2 * cfg.num_params() / 4 / s.chip.hbm_bytes_per_s
    assert (unit, by) == ("token", "HBM")
    assert weights <= seconds <= 1.01 * weights


def test_advice_skips_only_batches_whose_share_of_the_refused_temporaries_cannot_fit():
    # Temporaries shrink at most in proportion to the batch: 76.33G at 1024 lists is at least 19.08G at 256.
    cfg = preset_config("llama-3.2-1b", remat="full")
    p = programs.Program("pl-dpo step K=2", "train", cfg, batch=1024, k=2, length=512, optim=None)
    refused = compiler.Row(
        p.name,
        "",
        False,
        compiler_message="the total memory required for HLO temporaries (76.33G) exceeds available HBM (15.75G).",
    )
    assert compiler.refused_temporaries(refused) == (76.33 * 2**30, 15.75 * 2**30)
    smaller = {b: dataclasses.replace(p, batch=b) for b in (512, 256, 128)}
    assert "at least 19.08G" in advice.ruled_out(p, refused, smaller[256])
    assert advice.ruled_out(p, refused, smaller[128]) == ""  # 9.54G: only the compiler can tell
    # Another remat, another refusal sentence (arguments included), or none: nothing is ruled out.
    assert advice.ruled_out(p, refused, dataclasses.replace(smaller[256], model=cfg.replace(remat="none"))) == ""
    used = compiler.Row(p.name, "", False, compiler_message="Used 20.1G of 15.75G hbm. Exceeded hbm capacity by 4.4G")
    assert advice.ruled_out(p, used, smaller[512]) == "" and advice.ruled_out(p, None, smaller[512]) == ""


def test_decode_tp_bounds_list_every_group_and_name_a_faster_one(capsys):
    # Mistral-7B's grouped KV heads keep the cache small: the weight read decides the bound.
    cfg = preset_config("mistral-7b", compute_dtype="bfloat16")
    s = slices.get_slice("v5p-8")
    p = programs.Program(
        "sampler", "sample", cfg, batch=256, prompt_len=512, new_tokens=256, batch_field="sampling.batch_size"
    )
    by_tp = bounds.decode_tp_bounds(p, s, (1, -1, 1))
    assert list(by_tp) == [1, 2, 4] and by_tp[1] > by_tp[2] > by_tp[4]  # fewer weight bytes per chip
    assert bounds.time_bound(p, s, (1, -1, 1))[0] == by_tp[1]  # the rule: one chip holds the bf16 7B weights
    note = bounds.decode_tp_note(p, s, (1, -1, 1))
    assert "--config.sampling.decode_tp=4" in note and f"4: {by_tp[4] * 1e3:.2f}" in note
    assert bounds.decode_tp_note(dataclasses.replace(p, decode_tp=4), s, (1, -1, 1)) is None
    code, _, err = run_plan(
        capsys, "--config=configs/demo.py:quick", "--topology=v5e-4", "--only=sampler", "--config.sampling.decode_tp=3"
    )
    assert code == 2 and "decode_tp=3 must divide the mesh's fsdp size 4" in err


def test_train_bound_is_compute_at_large_batch():
    cfg = preset_config("llama-2-7b", compute_dtype="bfloat16", remat="full")
    s = slices.get_slice("v5e-16")
    optim = config_lib.optimizer(common.optimizer(1e-6, name="rmsprop"))
    p = programs.Program("step", "train", cfg, batch=64, k=2, length=1024, prompt_len=512, optim=optim)
    seconds, unit, by = bounds.time_bound(p, s, (1, -1, 1))
    tokens = 64 * 2 * 1024
    dense = 8 * cfg.num_params() * tokens / (16 * s.chip.peak_flops)  # 6N per token + 2N for the remat forward
    assert (unit, by) == ("step", "compute")
    assert dense <= seconds <= 1.2 * dense  # attention adds the rest


# ----------------------------------------------------------------------------- compiled figures


def test_planner_figures_are_memory_analysis_of_the_same_step():
    from flax import nnx

    from pl_dpo.data import RankedBatch
    from pl_dpo.models import create_model

    cfg = preset_config("tiny-llama", vocab_size=512, compute_dtype="bfloat16", remat="full")
    optim = config_lib.optimizer(common.optimizer(1e-5, name="adamw"))
    program = programs.Program("step", "train", cfg, batch=8, k=2, length=128, prompt_len=64, optim=optim)
    s = slices.get_slice("v5e-4")
    devices = slices.abstract_devices(s)
    loss_cfg = losses.LossConfig(T=0.1)
    row = compiler.compile_row(program, s, devices, (1, -1, 1), loss_cfg=loss_cfg, chunk_size=64)

    # The same step built by hand, as tests/test_tpu_aot.py does.
    mesh = sharding.make_mesh(1, -1, 1, devices=devices)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(cfg, seed=0)))
    rules = sharding.DEFAULT_DECODER_RULES
    param_sh = sharding.logical_to_shardings(params, mesh, rules)
    tx = optim.build(1000)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = sharding.logical_to_shardings(opt, mesh, rules, rank_mismatch="replicate")
    objective = train.pl_dpo_objective(loss_cfg, chunk_size=64)
    bsh = sharding.batch_sharding(mesh)
    step = train.make_train_step(graphdef, objective, tx, train.TrainState(param_sh, opt_sh), bsh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bsh)  # noqa: E731
    b, k, length = 8, 2, 128
    batch = RankedBatch(
        tokens_BxKxL=sds((b, k, length), "int32"),
        loss_mask_BxKxL=sds((b, k, length), "bool"),
        attn_valid_BxKxL=sds((b, k, length), "bool"),
        positions_BxKxL=sds((b, k, length), "int32"),
        valid_BxK=sds((b, k), "bool"),
        example_ids_B=None,
        ref_logps_BxK=sds((b, k), "float32"),
    )
    with_sh = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x), tree, sh
    )
    with jax.set_mesh(mesh):
        memory = step.lower(with_sh(params, param_sh), with_sh(opt, opt_sh), batch).compile().memory_analysis()
    assert row.fits
    assert row.argument_bytes == memory.argument_size_in_bytes
    assert row.temp_bytes == memory.temp_size_in_bytes
    # The compiler's own report counts buffers that share memory in time once: never above memory_analysis().
    assert 0 < row.compiler_total_bytes <= row.total_bytes


@pytest.mark.slow  # ~60 s: seven programs compiled, each with the compiler's memory report
def test_cli_plans_the_demo_config_and_every_program_fits(capsys):
    # SPIN alone: every kind of program (SFT step, Plackett-Luce step, scoring, sampler, evaluation, the harness's
    # scoring and generation) at 7 compiles of libtpu's ~10 s each; aSFT would add the K=3 step and scoring and
    # the assistant's sampler.
    code, out, err = run_plan(
        capsys, "--config=configs/demo.py:quick", "--topology=v5e-4", "--json", "--config.modes=spin",
        "--config.eval.harness.tasks=pl_dpo_arith_mc", f"--config.eval.harness.include_path={REPO}/configs/harness_tasks",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    names = [p["program"] for p in result["programs"]]
    assert names == ["sft step", "pl-dpo step K=2", "scoring K=2", "sampler", "evaluation (greedy)",
                     "harness log-likelihood", "harness generation (greedy)"]  # fmt: skip
    assert result["fits"] and all(p["fits"] and p["compiler_total_bytes"] > 0 for p in result["programs"])


@pytest.mark.slow  # ~90 s on a slow 2-core machine: a 1B step compiled twice (the others ruled out by its figures)
def test_a_step_that_does_not_fit_gets_the_nearest_setting_that_does(capsys):
    # A 1B model at 1024 lists of 2 x 512 tokens on a v5e-4: the activations do not fit 16 GiB chips;
    # the planner compiles micro-batches with gradient accumulation until one fits and names its flags.
    # Only the step is planned: the 1B sampler and evaluation programs would double the compile time.
    code, out, err = run_plan(
        capsys,
        "--config=configs/demo.py:quick",
        "--topology=v5e-4",
        "--only=pl-dpo step",
        "--config.modes=spin",
        "--config.sft.steps=0",
        "--config.model.preset=llama-3.2-1b",
        "--config.model.compute_dtype=bfloat16",
        "--config.model.remat=full",
        "--config.rounds.batch_size=1024",
        "--config.data.max_prompt_len=256",
        "--config.data.max_response_len=256",
        "--config.data.length_buckets=(512,)",
        "--config.sampling.max_new_tokens=8",
        "--config.eval.batch_size=8",
    )
    assert code == 1, err
    assert "pl-dpo step K=2: does not fit" in out
    advice = next(line for line in out.splitlines() if "fits with" in line)
    assert "--config.rounds.batch_size=" in advice and "--config.rounds.optim.grad_accum_steps=" in advice
    assert "(same 1024 lists per update)" in advice
    # 512 and 256 lists are ruled out by the refused step's own figures, without a compile.
    assert err.count("  skipping --config.rounds.batch_size=") == 2
    assert out.rstrip().endswith("does NOT fit")


@pytest.mark.slow  # ~45 s on a slow 2-core machine: two 13B samplers compiled
def test_a_model_no_setting_fits_names_the_smallest_slice():
    # 13B float32 weights are 12 GiB per chip on 4 v5e chips, and decoding reads a bf16 copy besides: no
    # sampling batch fits there, and the planner goes on to larger v5e slices. Llama-2-13B's widths and parameter
    # count in 8 layers instead of 40: decode steps loop over layers in Python, so this compiles ~3x faster.
    cfg = preset_config("llama-2-13b", param_dtype="float32", compute_dtype="bfloat16")
    cfg = cfg.replace(num_layers=8, intermediate_size=96256)
    assert abs(cfg.num_params() / preset_config("llama-2-13b").num_params() - 1) < 0.02
    program = programs.Program("sampler", "sample", cfg, batch=2, prompt_len=64, new_tokens=8, batch_field="sampling.b")
    s = slices.get_slice("v5e-4")
    tried = []
    said = advice.advise(program, s, slices.abstract_devices(s), (1, -1, 1), {}, tried.append)
    assert tried == ["  trying --config.sampling.b=1", "  trying v5litepod-8"]
    assert said == "nothing nearby fits on v5litepod-4; the smallest v5e slice that fits it: v5litepod-8"


@pytest.mark.slow  # ~40 s: two steps and two samplers of a 60M model compiled for a v5e-4
def test_lora_steps_and_int8_samplers_are_planned_with_their_own_state():
    """The LoRA step's arguments are the weights and the adapters' optimizer state (not 3x the weights); an
    assistant read straight into the decode layout in int8 holds one int8 copy, not the trained weights and a
    compute-dtype copy."""
    from pl_dpo.models.lora import LoraConfig

    cfg = preset_config("tiny-llama", vocab_size=8192, hidden_size=512, intermediate_size=2048, num_layers=8,
                        num_heads=8, num_kv_heads=8, head_dim=64, compute_dtype="bfloat16", param_dtype="bfloat16")  # fmt: skip
    optim = config_lib.optimizer(common.optimizer(1e-5, name="adamw"))
    s = slices.get_slice("v5e-4")
    devices = slices.abstract_devices(s)
    step = programs.Program("step", "train", cfg, batch=8, k=2, length=128, prompt_len=64, optim=optim)
    lora = dataclasses.replace(step, lora=LoraConfig(rank=8, alpha=16.0, rslora=False, targets="_proj$"))
    full_row, lora_row = (
        compiler.compile_row(p, s, devices, (1, -1, 1), loss_cfg=losses.LossConfig(T=0.1), chunk_size=64)
        for p in (step, lora)
    )
    weights = cfg.num_params() * 2 / 4  # bf16, over 4 chips
    assert full_row.fits and lora_row.fits and "LoRA r=8" in programs.settings_text(lora)
    assert full_row.argument_bytes > 2.5 * weights and lora_row.argument_bytes < 1.5 * weights
    sampling = sampler.SamplingConfig(max_new_tokens=8, eos_ids=(0,), pad_id=0)
    # Tensor parallel over the 4 chips in both (a 70B model's case): each chip holds a quarter of a decode copy.
    trained = programs.Program(
        "sampler", "sample", cfg, batch=8, prompt_len=64, new_tokens=8, sampling=sampling, decode_tp=4
    )
    shipped = dataclasses.replace(trained, sampling=dataclasses.replace(sampling, int8=True), from_folder=True)
    trained_row, shipped_row = (compiler.compile_row(p, s, devices, (1, -1, 1)) for p in (trained, shipped))
    assert shipped_row.fits and "int8 weights" in programs.settings_text(shipped)
    # The trained weights' sampler takes them as trained (bf16) and moves them; the shipped one takes its int8
    # decode copy alone (the embedding stays bf16).
    assert shipped_row.argument_bytes < 0.7 * trained_row.argument_bytes
    assert shipped_row.compiler_total_bytes < trained_row.compiler_total_bytes


# ----------------------------------------------------------------------------- bad input


def test_unknown_topology_lists_the_known_ones(capsys):
    code, _, err = run_plan(capsys, "--config=configs/demo.py:quick", "--topology=v5e-12")
    assert code == 2
    assert "unknown topology 'v5e-12'" in err and "v5litepod-16" in err and "v5p-8" in err and "v6e-64" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_config_field_is_one_line(capsys):
    code, _, err = run_plan(capsys, "--config=configs/demo.py:quick", "--topology=v5e-4", "--config.loss.TT=1")
    assert code == 2
    assert err.strip().splitlines() == ["error: the config has no field 'TT' (its fields: configs/common.py:base())"]


def test_missing_libtpu_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(slices.PlanError, match=r"pip install -e '\.\[tpu\]'"):
        slices.abstract_devices(slices.get_slice("v5e-4"))


def test_the_harness_is_planned_at_its_longest_rows_and_generations():
    from configs import spin

    config = spin.get_config(None)
    config.eval.harness.update(tasks="arc_easy", batch_size=8, max_length=4096)
    by_name = {p.name: p for p in programs.programs_of(config, [])}
    scoring = by_name["harness log-likelihood"]
    assert (scoring.kind, scoring.harness, scoring.batch, scoring.length) == ("score", True, 8, 4096)
    assert programs.settings_text(scoring) == "batch 8, rows of 4096 tokens"
    generation = by_name["harness generation (greedy)"]
    assert generation.new_tokens == 256 and generation.sampling.greedy
    assert generation.prompt_len + generation.new_tokens >= 4096  # the prompt bucket holds the longest prompt
    config.eval.harness.max_length = 0  # the model's own: mistral-7b's 32768 positions
    assert {p.name: p for p in programs.programs_of(config, [])}["harness log-likelihood"].length == 32768
    config.eval.harness.tasks = ""
    assert not any(p.name.startswith("harness") for p in programs.programs_of(config, []))


def test_folder_absent_takes_the_preset_and_says_so():
    from configs import spin

    config = spin.get_config(None)
    config.model.hf_path = "/nonexistent/zephyr-7b-sft-full"
    notes: list[str] = []
    planned = programs.programs_of(config, notes)
    assert planned[0].model == dataclasses.replace(planned[0].model)  # a DecoderConfig
    assert planned[0].model.num_params() == preset_config("mistral-7b").num_params()
    assert notes == [
        (
            "config.model: model folder '/nonexistent/zephyr-7b-sft-full' not found here; "
            "planning with the shape preset 'mistral-7b'"
        )
    ]
