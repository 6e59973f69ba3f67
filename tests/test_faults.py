"""Faults a user meets (issue 23): each ends in one line naming what and where, and nothing is lost.

Damaged derived data, a full or read-only disk, an unsupported model folder, data options a source does not
take, lists shorter than K, a mesh larger than the machine, the planner's --help, a config run from another
folder, and SIGTERM outside a training phase."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import demo
from pl_dpo import config_lib
from pl_dpo.data import DamagedFile, load_arrays, save_arrays
from pl_dpo.selfplay import modes, stages
from pl_dpo.workdir import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- derived data


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_stage_output_is_named_and_made_again(tmp_path, caplog, damage):
    path = str(tmp_path / "ranked.npz")
    arrays = {"tokens": np.arange(4096, dtype=np.int32).reshape(64, 64)}
    save_arrays(path, arrays)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[100:164] = bytes(255 - b for b in data[100:164])  # inside the array's bytes and its zip entry
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedFile, match=f"{path} is damaged"):
        load_arrays(path)
    made = []
    with caplog.at_level(logging.WARNING):
        out = stages.load_or_make(
            True, lambda: load_arrays(path), lambda: made.append(1) or arrays, lambda a: save_arrays(path, a)
        )
    assert made == [1] and np.array_equal(out["tokens"], arrays["tokens"])
    assert f"{path} is damaged" in caplog.text and "making it again" in caplog.text
    assert np.array_equal(load_arrays(path)["tokens"], arrays["tokens"])  # committed whole again


@pytest.mark.slow  # ~70 s: the quick demo's SPIN arm for one round, then for two
def test_an_earlier_rounds_damaged_set_is_made_again_for_round_mixing(tmp_path, main_command):
    flags = ("--config.modes=spin", "--config.sft.steps=8", "--config.rounds.max_steps=4",
             "--config.rounds.mix_previous=1")  # fmt: skip
    workdir = tmp_path / "run"
    first = main_command.run(workdir, *flags, "--config.rounds.num=1")
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = layout.ranked_set_path(str(workdir), "spin", 0)
    whole = load_arrays(earlier)
    data = bytearray(open(earlier, "rb").read())
    open(earlier, "wb").write(bytes(data[: len(data) // 2]))
    # Round 2 mixes round 1's set with its own: the damaged file is named, made again from πθ(1), the same.
    second = main_command.run(workdir, *flags, "--config.rounds.num=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{earlier} is damaged" in second.stderr and "making it again" in second.stderr
    again = load_arrays(earlier)
    assert sorted(again) == sorted(whole) and all(np.array_equal(again[k], whole[k]) for k in whole)


def test_a_killed_writers_half_file_goes_when_the_stage_commits(tmp_path):
    leftover = tmp_path / ".tmp-abc123.npz"
    leftover.write_bytes(b"PK\x03\x04 half")
    save_arrays(str(tmp_path / "samples.npz"), {"tokens": np.zeros(3, np.int32)})
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]


# ----------------------------------------------------------------------------- storage


def test_a_full_disk_is_one_line_naming_where_however_deep_the_cause():
    from pl_dpo import main

    cause = OSError(errno.ENOSPC, "No space left on device", "/runs/demo/spin/round_1/ranked.npz")
    try:
        try:
            raise cause
        except OSError as e:
            raise RuntimeError("orbax: async write failed") from e
    except RuntimeError as wrapped:
        message = main.storage_error(wrapped, "/runs/demo")
    assert message.startswith("no space left on the device of /runs/demo/spin/round_1/ranked.npz")
    assert "run the same command again" in message
    # A library that keeps only the text of the cause.
    assert main.storage_error(ValueError("INTERNAL: write: No space left on device"), "/w").startswith(
        "no space left on the device of /w"
    )
    assert main.storage_error(OSError(errno.EROFS, "Read-only file system", "/w/x"), "/w") == (
        "/w/x: Read-only file system"
    )
    assert main.storage_error(ValueError("a bug"), "/w") is None  # anything else keeps its traceback


def test_a_full_disk_says_how_much_a_checkpoint_of_the_run_takes(tmp_path):
    from pl_dpo import main

    for folder, size in (("sft/policies/0/params", 3 * 2**20), ("spin/round_0/train/2/opt_state", 5 * 2**20)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "data").write_bytes(b"x" * size)
    (tmp_path / "spin" / "round_0" / "ranked.npz").write_bytes(b"x" * 9 * 2**20)  # not a checkpoint
    assert main.largest_checkpoint_bytes(str(tmp_path)) == 5 * 2**20
    message = main.storage_error(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    assert "GiB free now; a checkpoint of this run takes 5.0 MiB)" in message
    assert main.largest_checkpoint_bytes(str(tmp_path / "absent")) == 0
    # Before the first save: the run's estimate.
    message = main.storage_error(OSError(errno.ENOSPC, "No space left"), str(tmp_path / "absent"), 3 * 2**20)
    assert "a checkpoint of this run takes about 3.0 MiB)" in message


def test_a_workdir_that_cannot_be_written_is_named():
    from pl_dpo import main

    # /sys refuses new folders even to root (a read-only mount does the same with EROFS).
    assert main.unwritable("/sys/pl_dpo_run") == "cannot write there (Operation not permitted)"


def test_a_workdir_on_a_read_only_mount_is_named(tmp_path, monkeypatch):
    from pl_dpo import main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(main.tempfile, "TemporaryFile", read_only)
    assert main.unwritable(str(tmp_path)) == "cannot write there (Read-only file system)"


# ----------------------------------------------------------------------------- model folders and config


def test_an_unsupported_model_folder_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    config = demo.get_config("quick")
    config.model.hf_path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config.json: model_type='gpt2' .* is not supported"):
        config_lib.model_config(config.model, 512)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(config_lib.ConfigError, match=r"config.json: Expecting property name"):
        config_lib.model_config(config.model, 512)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"n_trian": 10},
            r"config.data.options: data source 'synthetic' takes no option 'n_trian' \(its options: seed",
        ),
        ({"tasks": ("add", "divide")}, r"config.data.options: SyntheticConfig.tasks: unknown \['divide'\]"),
    ],
)
def test_data_options_a_source_does_not_take_are_named(options, message):
    config = demo.get_config("quick")
    config.data.options.update(options)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_a_mesh_larger_than_the_machine_is_named_before_the_batch_sizes():
    config = demo.get_config("quick")
    config.mesh.num_devices = 64
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.num_devices=64, but there are 8 devices"):
        config_lib.validate(config)
    config.mesh.num_devices, config.mesh.data, config.sft.batch_size = 0, 3, 7  # 7: not a multiple of anything
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh: mesh data=3 fsdp=-1 tensor=1 with 8 devices"):
        config_lib.validate(config)


def test_lists_shorter_than_k_are_counted_and_none_at_k_is_refused(caplog):
    def sources(lengths):
        responses = [[[1]] * n for n in lengths]
        return modes.ListSources([[1]] * len(lengths), responses, None, None, None)

    with caplog.at_level(logging.WARNING):
        ranked = modes.dataset_lists(sources([4, 3, 2]), 3)
    assert [len(lists) for lists in ranked.lists] == [3, 3, 2]
    assert "2 of 3 lists have K=3 responses; the shorter ones are masked" in caplog.text
    with pytest.raises(modes.ListSizeError, match=r"config.loss.K=5: no list in the data has 5 responses \(the long"):
        modes.dataset_lists(sources([4, 3, 2]), 5)


def test_a_tokenizer_without_a_chat_template_is_said_once(tmp_path, caplog):
    from pl_dpo.selfplay import run_data
    from pl_dpo.workdir.metric_log import MetricLog

    config = demo.get_config("quick")
    tokenizer = run_data.run_tokenizer(config, str(tmp_path))
    tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING), MetricLog(str(tmp_path)) as log:
        run_data.prepare_data(config, tokenizer, str(tmp_path), log)
    said = [r for r in caplog.records if "has no chat template" in r.getMessage()]
    assert len(said) == 1 and "'User: <prompt>\\nAssistant:\\n'" in said[0].getMessage()


def test_the_planner_lists_its_flags():
    from pl_dpo.plan import cli

    out = subprocess.run(
        [sys.executable, "-c", "import sys; from pl_dpo.plan import cli; sys.exit(cli.main(['--help']))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(cli.USAGE)
    for flag in ("--config", "--topology", "--[no]json", "--only", "--[no]advise"):
        assert flag in out.stdout


# ----------------------------------------------------------------------------- the main job


@pytest.mark.slow
def test_a_config_file_loads_from_any_working_directory(tmp_path, main_command):
    config = os.path.join(REPO, "configs", "demo.py") + ":quick"
    out = main_command.run(tmp_path / "run", "--config.sft.optim.lr=-1", config=config, cwd=tmp_path)
    # Read and checked: the config's own field, not "No module named 'configs'".
    assert out.returncode == 2 and out.stderr.strip().splitlines() == ["error: config.sft.optim.lr=-1.0 must be > 0"], (
        out.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start-up", "evaluating the SFT policy"])
def test_sigterm_outside_training_says_what_is_kept_and_how_to_resume(tmp_path, main_command, when):
    workdir = tmp_path / "run"
    sft_done = layout.policy_dir(str(workdir), "sft", 0)
    proc = subprocess.Popen(
        main_command.argv(workdir),
        cwd=main_command.cwd,
        env=main_command.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = (lambda: (workdir / ".lock").exists()) if when == "start-up" else (lambda: os.path.isdir(sft_done))
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "run the same command again to resume" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and "Fatal Python error" not in err and "*** SIGTERM" not in err, err
    assert not (workdir / ".lock").exists()


def test_the_error_that_ends_a_run_is_not_hidden_by_releasing_its_lock(tmp_path, monkeypatch):
    """A bucket gone mid-run: releasing the lock fails too; the run's own error is the one raised."""
    from pl_dpo.workdir.lock import WorkdirLock

    lock = WorkdirLock(tmp_path)

    def unreachable():
        raise OSError("storage unreachable while releasing")

    with pytest.raises(ConnectionError, match="the original cause"):
        with lock:
            monkeypatch.setattr(lock, "release", unreachable)
            raise ConnectionError("the original cause")


def test_a_bucket_out_of_reach_is_one_line_with_the_original_cause():
    from pl_dpo import main

    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 4443)")
        except OSError as e:
            raise RuntimeError("upload of metrics.jsonl failed") from e
    except RuntimeError as wrapped:
        message = main.storage_error(wrapped, "gs://bucket/run")
    assert message.startswith("the storage of gs://bucket/run cannot be reached (ConnectionRefusedError: ")
    assert "Connect call failed" in message and "run the same command again" in message


def test_orbax_thread_logs_of_a_storage_failure_are_left_to_the_runs_one_line():
    import logging

    from pl_dpo import main

    def record(path: str, error: BaseException | None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("absl", logging.ERROR, path, 387, "raised an exception", (), exc_info)

    keep = main.ReportedByTheRun("gs://bucket/run").filter
    refused = ConnectionRefusedError(111, "Connect call failed")
    orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
    assert not keep(record(orbax, refused))  # the main thread raises it again and says it in one line
    assert not keep(record(orbax, OSError(28, "No space left on device")))
    assert keep(record(orbax, ValueError("a bug")))  # anything else is shown as Orbax logs it
    assert keep(record("/venv/site-packages/other/lib.py", refused)) and keep(record(orbax, None))


def test_callbacks_into_a_closed_event_loop_are_not_printed_and_nothing_else_is_hidden():
    import asyncio
    import types

    from pl_dpo import main

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    # As TensorStore's native callback reports it: the traceback starts in call_soon_threadsafe.
    from_native = closed.__traceback__.tb_next
    seen = []
    hook = main.quiet_closed_loop_callbacks(seen.append)
    args = types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed, exc_traceback=from_native, object=None)
    hook(args)
    assert seen == []
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"), exc_traceback=from_native)
    from_python = types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed, exc_traceback=closed.__traceback__)
    hook(other)
    hook(from_python)
    assert seen == [other, from_python]


@contextlib.contextmanager
def _tmpfs(mount, options: str):
    """A real tmpfs mounted at `mount` (needs root, as on CI's machines; skips the test elsewhere)."""
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB disk: the demo's first checkpoints fill it."""
    with _tmpfs(tmp_path / "small_disk", "size=1600k") as mount:
        yield mount


@pytest.mark.slow  # ~35 s: three runs of the command that stop before any work
def test_a_real_read_only_mount_and_an_unknown_model_type_are_one_line_from_the_command(tmp_path, main_command):
    with _tmpfs(tmp_path / "read_only", "ro,size=64k") as mount:
        proc = main_command.run(mount / "run", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={mount}/run: cannot write there (Read-only file system)"
    )
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    proc = main_command.run(tmp_path / "run", f"--config.model.hf_path={folder}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: config.model.hf_path='{folder}': {folder}/config.json: model_type='gpt2'"), last
    assert "is not supported" in last
    # A supported model without tokenizer files.
    from pl_dpo.models import preset_config
    from pl_dpo.models.config import to_hf_config

    (folder / "config.json").write_text(json.dumps(to_hf_config(preset_config("tiny-llama", vocab_size=512))))
    proc = main_command.run(tmp_path / "run", f"--config.model.hf_path={folder}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: config.model.hf_path: '{folder}' holds no tokenizer files (tokenizer.json / tokenizer_config.json); "
        "found ['config.json']"
    )


@pytest.mark.slow  # ~40 s: the demo until its disk is full, then resumed on a larger one
def test_a_real_full_disk_is_one_line_and_the_run_resumes(small_disk, tmp_path, main_command):
    from pl_dpo import main

    flags = ("--config.modes=spin", "--config.sft.steps=8", "--config.rounds.max_steps=4")
    full = main_command.run(small_disk / "run", *flags, "--config.checkpoint.save_every_steps=2")
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the device of {small_disk}/run"), full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr, full.stderr[-3000:]
    # The first save failed: the space it needs is the estimate (SelfPlay.train_state_bytes).
    estimate_mib = float(last.split("a checkpoint of this run takes about ")[1].split(" MiB")[0])
    # Space freed (here: the workdir moved to a larger disk): the same command resumes and ends.
    subprocess.run(["cp", "-a", str(small_disk / "run"), str(tmp_path / "run")], check=True)
    resumed = main_command.run(tmp_path / "run", *flags, "--config.checkpoint.save_every_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Held-out evaluation" in resumed.stdout
    # What is left of the run is its policies (train states go when a phase ends): weights only, a third of a
    # train state.
    policy_mib = main.largest_checkpoint_bytes(str(tmp_path / "run")) / 2**20
    assert 0.9 * 3 * policy_mib < estimate_mib < 1.1 * 3 * policy_mib, (estimate_mib, policy_mib)
