"""Quiet by default (issue 20, item 8): a run's stderr says what happens and nothing else.

Building a dataset from local files prints none of TFDS's download talk or config dumps; bad rows
are logged a few at a time plus one count; and a job on a CPU machine never loads libtpu (the `tpu`
extra), while a machine with TPUs or GPUs is left to JAX's own choice.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import jax_env

from pl_dpo.data import files as data_files
from pl_dpo.data import make_builder, read_split, skipped_rows

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

# What TFDS says around a build of a local dataset (on stdout, and in its log at WARNING).
TFDS_NOISE = ("Downloading and preparing", "downloaded and prepared", "Using custom data configuration", "LocalConfig(")
# What libtpu and JAX's TPU backend print when libtpu is loaded on a machine without TPUs.
TPU_NOISE = re.compile(r"libtpu|TPU|tpu|jellyfish|InitGoogle")


def test_building_local_data_prints_no_tfds_download_talk(tmp_path, capfd, caplog):
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):  # the second builder finds the build on disk and reuses it
            synthetic = make_builder("synthetic", data_dir=str(tmp_path), n_train=8, n_test=4)
            ranked = make_builder(
                "ranked_jsonl",
                data_dir=str(tmp_path),
                files={"train": str(FIXTURES / "ranked.jsonl")},
                skip_bad_rows=True,
            )
    assert len(read_split(synthetic, "train")) == 8 and len(read_split(ranked, "train")) > 0
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        for noise in TFDS_NOISE:
            assert noise not in text, (noise, text)
    assert not out  # nothing of a build goes to stdout, which holds the job's results
    assert "building pl_dpo_synthetic/synthetic_" in caplog.text  # what TFDS printed, at DEBUG


def test_bad_rows_are_logged_a_few_at_a_time_then_counted(tmp_path, caplog):
    path = tmp_path / "ranked.jsonl"
    rows = [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)]
    rows += [{"prompt": "", "responses": ["a", "b"]} for _ in range(8)]
    rows += [{"prompt": "q", "responses": ["only one"]} for _ in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        b = make_builder(
            "ranked_jsonl", data_dir=str(tmp_path / "tfds"), files={"train": str(path)}, skip_bad_rows=True
        )
    assert len(read_split(b, "train")) == 3 and sum(skipped_rows(b)["skipped_train"].values()) == 12
    lines = caplog.text.splitlines()
    one_by_one = [line for line in lines if "Skipping bad row" in line]
    assert len(one_by_one) == data_files.MAX_LOGGED_ROWS and "row 4: field 'prompt': empty" in one_by_one[0]
    (count,) = [line for line in lines if "bad rows skipped" in line]
    assert "split 'train'" in count and str(path) in count
    assert "12 bad rows skipped (prompt: empty: 8, responses:" in count and ": 4)" in count


def test_few_bad_rows_need_no_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_builder(
            "ultrafeedback",
            data_dir=str(tmp_path),
            files={"train": str(FIXTURES / "ultrafeedback.jsonl")},
            skip_bad_rows=True,
        )
    assert caplog.text.count("Skipping bad row") == 4 and "bad rows skipped" not in caplog.text


# The start of `python -m pl_dpo.main`: JAX imported, the platform chosen, then the devices used.
# A hardware probe can be faked: FAKE=tpu (four chips on the PCI bus) or FAKE=nvidia (/dev/nvidia0);
# USE_DEVICES=1 goes on to start the backend, as the job's first use of a device does.
_START = """
import os, sys
from jax._src import hardware_utils
fake = os.environ.get("FAKE")
if fake == "tpu":
    hardware_utils.num_available_tpu_chips_and_device_id = lambda: (4, None)
elif fake == "nvidia":
    hardware_utils.has_visible_nvidia_gpu = lambda: True
import jax
from pl_dpo.main import skip_absent_tpu
skip_absent_tpu()
print("platforms", jax.config.jax_platforms)
if os.environ.get("USE_DEVICES"):
    print("backend", jax.default_backend(), len(jax.devices()))
"""


def _start(**env: str) -> subprocess.CompletedProcess:
    child = jax_env(1)
    del child["JAX_PLATFORMS"]  # as on a user's machine: nothing set, unless `env` sets it
    child.update(env)
    return subprocess.run(
        [sys.executable, "-c", _START], check=False, cwd=REPO, env=child, capture_output=True, text=True, timeout=300
    )


def _machine_has_accelerators() -> bool:
    from jax._src import hardware_utils

    return bool(
        hardware_utils.num_available_tpu_chips_and_device_id()[0]
        or hardware_utils.has_visible_nvidia_gpu()
        or hardware_utils.num_available_amd_gpus(stop_at=1)
        or glob.glob("/dev/accel*")
        or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    )


@pytest.mark.skipif(_machine_has_accelerators(), reason="this machine has TPUs or GPUs: JAX rightly looks for them")
def test_a_cpu_machine_never_loads_libtpu():
    run = _start(USE_DEVICES="1")
    assert run.returncode == 0, run.stderr
    assert "platforms cpu" in run.stdout and "backend cpu 1" in run.stdout
    assert not TPU_NOISE.search(run.stderr), run.stderr


@pytest.mark.parametrize(
    "env, platforms",
    [
        ({"FAKE": "tpu"}, "None"),  # a TPU VM: JAX finds its TPUs
        ({"FAKE": "nvidia"}, "None"),  # a GPU: JAX finds it (or says why not)
        ({"JAX_PLATFORMS": ""}, ""),  # set, even empty ("let JAX choose"): kept
        ({"JAX_PLATFORMS": "cpu"}, "cpu"),
        ({"JAX_FORCE_TPU_INIT": "1"}, "tpu,cpu"),  # JAX's own switch, which sets it itself
    ],
)
def test_accelerators_and_explicit_choices_are_left_to_jax(env, platforms):
    run = _start(**env)
    assert run.returncode == 0, run.stderr
    assert f"platforms {platforms}\n" in run.stdout, run.stdout


# A log line in absl's format ("I1207 06:04:54.799188 1396 rounds.py:193] ...") names its file.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ")
_PROGRESS = re.compile(r"\d+%\|")  # tqdm


@pytest.mark.slow
@pytest.mark.skipif(_machine_has_accelerators(), reason="this machine has TPUs or GPUs: JAX rightly looks for them")
def test_the_quick_demo_says_only_what_happens(main_command, tmp_path):
    """The whole job as a user starts it (no JAX_PLATFORMS): stderr holds progress bars and pl_dpo's
    own log lines, stdout the results, and nothing else."""
    env = main_command.env()
    del env["JAX_PLATFORMS"]
    run = main_command.run(tmp_path / "wd", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = {p.name for p in (REPO / "pl_dpo").rglob("*.py")}
    lines = [line for line in re.split(r"[\r\n]+", run.stderr) if line.strip() and not _PROGRESS.search(line)]
    foreign = [line for line in lines if not (m := _LOG_LINE.match(line)) or m.group(1) not in ours]
    assert not foreign, "\n".join(foreign)
    assert sum("] eval {" in line for line in lines) == 3  # sft, spin round 1, asft round 1
    assert run.stdout.lstrip().startswith("Held-out evaluation"), run.stdout[:1000]
