"""`--workdir=gs://bucket/path`: every file of a run in a bucket, against a local storage emulator
(tests/gcs_emulator.py): the path layer, the metric log, the lock, a killed run resumed to the
results of a local one, and the URL schemes that are refused."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from etils import epath

from pl_dpo.data import assemble_ranked, load_ranked_set
from pl_dpo.selfplay import stages
from pl_dpo.workdir import bucket
from pl_dpo.workdir import layout as wd
from pl_dpo.workdir import lock as workdir_lock

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from gcs_emulator import running_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs():
    with running_emulator() as emulator:
        yield emulator


def _generation(path: str) -> int:
    return int(bucket.filesystem(path).info(path)["generation"])


def test_layout_and_stage_files_in_a_bucket(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would become ./gs:
    monkeypatch.setenv("PL_DPO_CACHE", str(tmp_path / "cache"))
    w = wd.absolute(f"{gcs.url}/layout/")
    assert w == f"{gcs.url}/layout" and wd.absolute("rel") == os.path.join(str(tmp_path), "rel")
    assert wd.policy_dir(w, "spin", 2) == f"{gcs.url}/layout/spin/policies/2"
    assert wd.tfds_dir(w) == str(tmp_path / "cache" / "tfds")  # array_record files are local files
    assert wd.compilation_cache_dir(w) == f"{gcs.url}/layout/jax_cache"
    # JSON stage outputs: written whole, read back, listed.
    path = wd.eval_path(w, "sft", 0)
    assert not stages.exists(path)
    stages.write_json(path, {"metrics": {"exact_match": 0.5}})
    assert stages.exists(path) and stages.read_json(path) == {"metrics": {"exact_match": 0.5}}
    wd.atomic_write_text(path, json.dumps({"metrics": {}}))  # an object is replaced whole
    assert stages.read_json(path) == {"metrics": {}}
    # Cached samples and a ranked set: one .npz object each, exact arrays back.
    responses = [[5, 6, 2], [7, 2], [9]]
    stages.save_samples(wd.samples_path(w, "sft"), responses, pad_id=0)
    assert stages.load_samples(wd.samples_path(w, "sft")) == responses
    ranked = assemble_ranked([[1, 3], [4]], [[[5, 2], [6]], [[7, 8, 2]]], pad_id=0, k=2)
    stages.save_ranked(wd.ranked_set_path(w, "spin", 1), ranked)
    back = load_ranked_set(wd.ranked_set_path(w, "spin", 1))
    assert back.arrays().keys() == ranked.arrays().keys()
    assert all(np.array_equal(getattr(back, k), v) for k, v in ranked.arrays().items())
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        load_ranked_set(wd.ranked_set_path(w, "spin", 0))
    assert sorted(p.name for p in epath.Path(wd.lineage_dir(w, "sft")).iterdir()) == ["eval_0.json", "samples.npz"]
    # An Orbax step is committed by its metadata's timestamp, with every item present.
    step = wd.policy_dir(w, "sft", 0)
    assert not wd.step_committed(step, ("params", "metadata"))
    epath.Path(step, "params", "x").write_text("x")
    epath.Path(step, "metadata", "x").write_text("x")
    epath.Path(step, wd.CHECKPOINT_METADATA).write_text(json.dumps({"commit_timestamp_nsecs": None}))
    assert not wd.step_committed(step, ("params", "metadata"))
    epath.Path(step, wd.CHECKPOINT_METADATA).write_text(json.dumps({"commit_timestamp_nsecs": 12}))
    assert wd.policy_committed(w, "sft", 0) and not wd.step_committed(step, ("params", "opt_state"))
    # A step a killed save left uncommitted is moved aside (a copy and a delete in a bucket), never deleted.
    from pl_dpo.training import checkpoint

    train = epath.Path(wd.train_state_dir(wd.round_dir(w, "spin", 0)))
    (train / "4" / "params" / "x").write_text("x")
    checkpoint._set_aside_incomplete(train, checkpoint.TrainCheckpoints.ITEMS)
    (aside,) = list(train.iterdir())
    assert aside.name.startswith("4.incomplete-") and (aside / "params" / "x").read_text() == "x"
    assert not (tmp_path / "gs:").exists()


def test_folders_are_uploaded_with_their_marker_last(gcs, tmp_path):
    remote = f"{gcs.url}/folders/tokenizer"
    with bucket.staged_folder(remote, marker="tokenizer.json") as local:
        assert local != remote and os.path.isdir(local)
        for name in ("tokenizer.json", "a_config.json", "z_template.jinja"):
            with open(os.path.join(local, name), "w") as f:
                f.write(name)
    objects = {p.name: _generation(os.fspath(p)) for p in epath.Path(remote).iterdir()}
    assert max(objects, key=objects.get) == "tokenizer.json"  # the commit point comes last
    with bucket.local_folder(remote) as local:
        assert sorted(os.listdir(local)) == sorted(objects)
        assert open(os.path.join(local, "a_config.json")).read() == "a_config.json"
    # A failure while writing uploads nothing: the folder stays uncommitted.
    with pytest.raises(RuntimeError), bucket.staged_folder(f"{gcs.url}/folders/broken", marker="m") as local:
        open(os.path.join(local, "m"), "w").close()
        raise RuntimeError("killed")
    assert not epath.Path(f"{gcs.url}/folders/broken").exists()
    # A local folder is written aside and renamed into place: complete or absent (tests/test_workdir.py).
    out = tmp_path / "tokenizer"
    with bucket.staged_folder(str(out), marker="m") as local:
        assert os.path.dirname(local) == str(tmp_path) and not out.exists()
        open(os.path.join(local, "m"), "w").close()
    assert os.listdir(tmp_path) == ["tokenizer"] and os.listdir(out) == ["m"]
    with bucket.local_folder(str(out)) as same:
        assert same == str(out)


def test_metric_log_reaches_the_bucket_at_commit_points(gcs):
    from pl_dpo.workdir.metric_log import MetricLog

    w = f"{gcs.url}/metrics"
    path = epath.Path(w, "metrics.jsonl")
    log = MetricLog(w)
    for step in range(4):
        log.write("sft", step, {"loss": float(step), "scores_K": [1.0, 2.0]})
    assert not path.exists()  # held in memory: an object cannot be appended to
    bucket.before_commit()  # what a checkpoint save or a stage's output does first
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    log.drop({"sft": 2})  # a resumed phase logs steps 2, 3 again
    log.write("sft", 2, {"loss": 20.0})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 20.0)]
    assert next(epath.Path(w, "tensorboard").iterdir()).name.startswith("events.out.tfevents")
    # A resumed run appends to what the bucket holds.
    again = MetricLog(w)
    again.write("eval/sft", 0, {"exact_match": 0.5})
    again.close()
    assert [json.loads(line)["phase"] for line in path.read_text().splitlines()] == ["sft"] * 3 + ["eval/sft"]
    bucket.before_commit()  # closed logs are no longer flushed


def test_bucket_lock(gcs, monkeypatch):
    w = f"{gcs.url}/locked"
    lock_path = epath.Path(w, workdir_lock.LOCK_NAME)
    with workdir_lock.WorkdirLock(w):
        holder = json.loads(lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["token"]
        # The lock object is created with if-generation-match=0: a second create is refused.
        with pytest.raises(FileExistsError):
            bucket.filesystem(os.fspath(lock_path)).pipe_file(os.fspath(lock_path), b"{}", mode="create")
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"is in use by pid {os.getpid()} on .* since"):
            workdir_lock.WorkdirLock(w).acquire()
    assert not lock_path.exists()  # released
    # A run killed on this host without releasing: its process is gone, the lock is taken over.
    lock_path.write_text(json.dumps({"pid": 2**22 + 1, "host": os.uname().nodename, "heartbeat": time.time()}))
    with workdir_lock.WorkdirLock(w):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    # Another host's lock whose heartbeat stopped long ago: taken over at once.
    lock_path.write_text(json.dumps({"pid": 1, "host": "tpu-worker-7", "heartbeat": time.time() - 3600}))
    with workdir_lock.WorkdirLock(w):
        pass
    # Another host's live run (its heartbeat moves): refused once the next heartbeat is seen.
    monkeypatch.setattr(bucket.socket, "gethostname", lambda: "tpu-worker-7")
    other = bucket.BucketLock(w, heartbeat_s=0.2)
    other.acquire(workdir_lock.WorkdirLock(w)._locked)
    monkeypatch.undo()
    try:
        start = time.time()
        mine = bucket.BucketLock(w, stale_s=30)
        with pytest.raises(workdir_lock.WorkdirLocked, match="on tpu-worker-7 .* or delete .*.lock if it is gone"):
            mine.acquire(workdir_lock.WorkdirLock(w)._locked)
        assert time.time() - start < 10
    finally:
        other.release()
    # Another host's lock that sends no heartbeat for `stale_s`: that run is gone, taken over.
    lock_path.write_text(json.dumps({"pid": 1, "host": "tpu-worker-7", "token": "t", "heartbeat": time.time()}))
    mine = bucket.BucketLock(w, stale_s=1.0)
    mine.acquire(workdir_lock.WorkdirLock(w)._locked)
    assert json.loads(lock_path.read_text())["token"] == mine._me["token"]
    mine.release()


def test_the_lock_watchdog_says_when_the_storage_has_been_gone_for_stale_s():
    with running_emulator() as storage:
        said: list[str] = []
        lock = bucket.BucketLock(f"{storage.url}/watched", heartbeat_s=0.2, stale_s=4.0, on_lost=said.append)
        lock.acquire(workdir_lock.WorkdirLock(f"{storage.url}/watched")._locked)
        time.sleep(1.0)
        assert not said  # heartbeats reach the storage
        storage.stop()
        gone_at = time.time()
        while not said and time.time() - gone_at < 30:
            time.sleep(0.1)
        lock._stop.set()  # the heartbeat thread is inside gcsfs's retries: it ends after them
    waited_s = time.time() - gone_at
    assert len(said) == 1 and said[0].startswith(f"the storage of {storage.url}/watched has not been reachable for")
    # Counted from the last heartbeat that arrived (up to 0.2 s before the storage went): at least stale_s.
    silent_s = float(said[0].split("reachable for ")[1].split(" s")[0])
    assert silent_s >= 4.0 and waited_s < 10.0, (silent_s, waited_s)


def test_workdir_errors(gcs):
    from pl_dpo.main import workdir_error

    assert workdir_error(f"{gcs.url}/run") is None
    assert "does not exist" in workdir_error("gs://no-such-bucket-here/run")
    assert workdir_error("gs:///run") == "names no bucket (gs://bucket/path)"
    epath.Path(gcs.url, "an-object").write_text("x")
    assert workdir_error(f"{gcs.url}/an-object") == "is an object, not a folder"
    for url in ("s3://bucket/run", "http://host/run", "file:///tmp/run"):
        scheme = url.split(":")[0]
        assert workdir_error(url) == f"{scheme}:// workdirs are not supported; use a local folder or a gs://bucket/path"


@pytest.mark.slow
@pytest.mark.parametrize("url", ["s3://bucket/run", "http://example.com/run"])
def test_other_url_schemes_are_refused_in_one_line(tmp_path, main_command, url):
    proc = main_command.run(
        url,
        config=f"{main_command.cwd}/configs/demo.py:quick",
        cwd=tmp_path,  # a URL taken for a local path would land here
        env=dict(main_command.env(), PYTHONPATH=main_command.cwd),
        timeout=300,
    )
    scheme = url.split(":")[0]
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={url}: {scheme}:// workdirs are not supported; use a local folder or a gs://bucket/path"
    )
    assert os.listdir(tmp_path) == []


# Checkpoints every 2 steps: round 0 has a committed mid-round state to be killed after. Its 12
# steps leave five more bucket saves (seconds) between the step-2 commit the test waits for and
# round 0's policy: the test's polling of the bucket lags behind the run, more so on a loaded machine.
OVERRIDES = [
    "--config.modes=spin",
    "--config.sft.steps=8",
    "--config.rounds.max_steps=12",
    "--config.checkpoint.save_every_steps=2",
    "--config.export_hf=True",
]
VOLATILE = ("time", "tokens_per_s", "seconds")


def _records(path: str) -> dict[tuple[str, int], dict]:
    """metrics.jsonl by (phase, step), without wall-clock fields; asserts one record per training step."""
    out, seen = {}, []
    for line in epath.Path(path).read_text().splitlines():
        r = json.loads(line)
        out[r["phase"], r["step"]] = {k: v for k, v in r.items() if k not in VOLATILE}
        seen.append((r["phase"], r["step"]))
    train = [k for k in seen if k[0] in ("sft", "spin/round_0")]
    assert len(train) == len(set(train)), "a training step logged twice"
    return out


def _table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_killed_bucket_run_resumes_to_the_results_of_a_local_run(gcs, tmp_path, main_command):
    local = tmp_path / "local"
    ref = main_command.run(local, *OVERRIDES)
    assert ref.returncode == 0, ref.stderr[-3000:]

    workdir = f"{gcs.url}/e2e"
    cwd = tmp_path / "cwd"  # the run's working directory: a URL taken for a path would land here
    cwd.mkdir()
    env = dict(main_command.env(), **gcs.env, PYTHONPATH=REPO, PL_DPO_CACHE=str(tmp_path / "cache"))
    argv = main_command.argv(workdir, *OVERRIDES, config=f"{REPO}/configs/demo.py:quick")
    killed_log = tmp_path / "killed_run.log"  # what the killed run printed, for a failure's message
    with open(killed_log, "w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        mid_round = wd.train_state_dir(wd.round_dir(workdir, "spin", 0)) + "/2"
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if wd.step_committed(mid_round, ("params", "opt_state", "extra")):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    printed = killed_log.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}):\n{printed}"
    # Killed mid-round: round 0's ranked set is committed, its policy (πθ(1)) is not; the lock is left behind.
    assert stages.exists(wd.ranked_set_path(workdir, "spin", 0)), printed
    assert not wd.policy_committed(workdir, "spin", 1), "killed too late: round 0 had already ended"
    assert epath.Path(workdir, workdir_lock.LOCK_NAME).exists()

    resumed = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _table(resumed.stdout) == _table(ref.stdout) and len(_table(ref.stdout)) == 4
    for lineage, index in (("sft", 0), ("spin", 1)):  # metrics and greedy answers, bit for bit
        assert stages.read_json(wd.eval_path(workdir, lineage, index)) == stages.read_json(
            wd.eval_path(str(local), lineage, index)
        )
    assert _records(f"{workdir}/metrics.jsonl") == _records(str(local / "metrics.jsonl"))
    assert epath.Path(workdir, "results.md").read_text() == (local / "results.md").read_text()
    assert epath.Path(workdir, "results.png").stat().length > 10_000
    assert list(epath.Path(workdir, "tensorboard").iterdir())
    export = epath.Path(wd.export_dir(workdir, "spin", 1))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    assert epath.Path(workdir, "tokenizer", "tokenizer.json").exists()
    assert not epath.Path(workdir, workdir_lock.LOCK_NAME).exists()  # taken over from the killed run, released
    assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(REPO, "gs:"))


@pytest.mark.slow  # ~60 s: the demo until SFT's first checkpoint, then the storage goes away
def test_a_run_whose_bucket_goes_away_stops_in_bounded_time_in_one_line(tmp_path, main_command):
    # The lock's timings, shortened: a heartbeat every second, and the run stops once 10 s pass without one
    # (another run could take the workdir over by then). gcsfs and TensorStore would retry for minutes.
    with running_emulator() as storage:
        workdir = f"{storage.url}/gone"
        env = dict(main_command.env(), **storage.env, PYTHONPATH=REPO, PL_DPO_CACHE=str(tmp_path / "cache"))
        env.update(PL_DPO_LOCK_HEARTBEAT_S="1", PL_DPO_LOCK_STALE_S="10")
        argv = main_command.argv(workdir, *OVERRIDES, config=f"{REPO}/configs/demo.py:quick")
        with open(tmp_path / "run.log", "w") as log:
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
            first = wd.train_state_dir(wd.lineage_dir(workdir, "sft")) + "/2"
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if wd.step_committed(first, ("params", "opt_state", "extra")):
                    break
                time.sleep(0.1)
            storage.stop()
            gone_at = time.time()
            proc.wait(timeout=300)
            waited_s = time.time() - gone_at
    err = (tmp_path / "run.log").read_text()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the storage of {workdir} ") and "resumes from what is saved" in last, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert waited_s < 10 + 20, f"{waited_s:.0f} s after the storage went away"
