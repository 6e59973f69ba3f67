"""Entry point: `python -m pl_dpo.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.x=y]`.

Runs the whole self-play job of the config (SFT -> assistants -> rounds) in the
workdir, resuming whatever an earlier run on the same workdir left unfinished, and
prints one line per evaluated policy at the end.

Configs (configs/): demo.py (the built-in demo, `:quick` the CI-sized form), spin.py (SPIN as
in the paper, `:rounds=N`), asft.py (aSFT, K=3), offline.py (ranked lists, `:tiny`,
`:source=ranked_jsonl`), study.py / study_ladder.py (the first study, experiments/RESULTS_study1.md),
study2.py (the second, experiments/RESULTS.md).
Every field of a config is in configs/common.py:base(); the README explains the modes, and
docs/ARCHITECTURE.md the rest. Mistakes in flags, the config, the data or the workdir end in
one line starting with "error:" and exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from typing import NoReturn

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from pl_dpo import config_file

flags.DEFINE_string(
    "workdir", None, "Run folder (local, or gs://bucket/path): checkpoints, ranked sets, metrics.jsonl, TensorBoard."
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU / GPU).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (only where the cluster is not detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/<name>.py[:arg]).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

TABLE_COLUMNS = ["policy", "exact_match", "answer_logp", "answer_logp_per_token", "reward_accuracy", "win_rate_vs_sft"]


def main(argv: list[str]) -> None:
    del argv
    import jax

    skip_absent_tpu()
    if FLAGS.distributed:
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            # Cross-process collectives on CPU (the 2-process tests) go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    from pl_dpo import config_lib, evaluate  # after distributed init: they touch devices
    from pl_dpo.data import DataError
    from pl_dpo.models.hf_io import ModelFolderError
    from pl_dpo.models.lora import LoraError
    from pl_dpo.selfplay import modes, rounds
    from pl_dpo.training.preemption import Preempted, sigterm_stops_the_run
    from pl_dpo.workdir import agreement, plots
    from pl_dpo.workdir.layout import compilation_cache_dir
    from pl_dpo.workdir.lock import WorkdirLock, WorkdirLocked

    # Mistakes in what the user gave (config, data, workdir): one line naming what and where, exit 2.
    user_errors = (
        config_lib.ConfigError,
        agreement.WorkdirConfigMismatch,
        DataError,
        ModelFolderError,
        LoraError,
        modes.ListSizeError,
        WorkdirLocked,
    )

    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(ReportedByTheRun(FLAGS.workdir))
    sys.unraisablehook = quiet_closed_loop_callbacks(sys.unraisablehook)
    try:
        config = FLAGS.config
        config.get("modes")  # the config file is read lazily, at its first use
    except (flags.Error, ValueError, TypeError, OSError) as e:
        user_error(f"--config={FLAGS['config'].serialize().split('=', 1)[-1]}: {_one_line(e.__cause__ or e)}")
    workdir_problem = workdir_error(FLAGS.workdir) or unwritable(FLAGS.workdir)
    if workdir_problem:
        user_error(f"--workdir={FLAGS.workdir}: {workdir_problem}")
    # Every round builds the same step and sampler programs again: a compilation cache in the
    # workdir turns those recompiles (and a resumed run's) into cache reads.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(FLAGS.workdir))
    # One run per workdir, held by process 0 (the others share its workdir).
    lock = WorkdirLock(FLAGS.workdir, storage_failed) if jax.process_index() == 0 else contextlib.nullcontext()
    self_play = None
    try:
        with lock, sigterm_stops_the_run(FLAGS.workdir):
            self_play = rounds.SelfPlay(config, FLAGS.workdir)
            table = self_play.run()
    except Preempted as e:
        print(e.message, file=sys.stderr)
        raise
    except user_errors as e:
        user_error(str(e))
    except Exception as e:
        estimate = self_play.train_state_bytes() if self_play is not None else 0
        problem = storage_error(e, FLAGS.workdir, estimate)
        if problem is None:
            raise
        storage_failed(problem)
    if jax.process_index() == 0:
        columns = [c for c in TABLE_COLUMNS if any(c in row for row in table)]
        columns += plots.harness_metrics(table)  # their stderr is in eval_<t>.json and metrics.jsonl
        text = evaluate.format_table(table, columns)
        epath.Path(FLAGS.workdir, "results.md").write_text(text + "\n", encoding="utf-8")
        print("\nHeld-out evaluation (" + FLAGS.workdir + "/results.md):\n" + text)
        if plots.plot_rounds(table, os.path.join(FLAGS.workdir, "results.png")):
            print(f"Plot: {FLAGS.workdir}/results.png")


def skip_absent_tpu() -> None:
    """Keeps JAX from loading libtpu (the `tpu` extra) on a machine without TPUs.

    Left to choose, JAX tries every backend it knows, TPU included: libtpu loads, takes
    /tmp/libtpu_lockfile, looks for chips and prints a screen of errors on stderr before JAX falls
    back to the CPU. On a TPU VM JAX itself sets jax_platforms="tpu,cpu" when it is imported, and
    an explicit JAX_PLATFORMS (even empty: let JAX choose) or --jax_platforms is kept as it is. So
    JAX_PLATFORMS=cpu is set here only where JAX chose nothing and no accelerator can be seen: no TPU
    (on the PCI bus or as a device file) or NVIDIA / AMD GPU, and no other PJRT plugin installed (which
    could name hardware of its own). A GPU machine with the `tpu` extra is left to JAX, libtpu and all.
    """
    import jax

    if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    try:
        from jax._src import hardware_utils, xla_bridge
    except ImportError:  # JAX moved its internals: let it choose
        return
    if xla_bridge.backends_are_initialized():
        return
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu():
        return
    if _tpu_device_files():  # a container may show TPUs as device files and not on the PCI bus
        return
    amd_gpus = getattr(hardware_utils, "num_available_amd_gpus", None)
    if amd_gpus is None or amd_gpus(stop_at=1):
        return
    if _pjrt_plugins() - {"cuda", "rocm"}:
        return
    jax.config.update("jax_platforms", "cpu")


def _tpu_device_files() -> list[str]:
    """The device files libtpu opens: /dev/accel* (TPU v2 to v4), /dev/vfio/<group> (v5e and later)."""
    import glob

    return glob.glob("/dev/accel*") + [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]


def _pjrt_plugins() -> set[str]:
    """The installed JAX PJRT plugins (jax_plugins modules and entry points), named by the hardware
    they are for where their name says it ("jax_plugins.xla_cuda12" -> "cuda")."""
    import importlib.metadata
    import pkgutil

    names = set()
    try:
        import jax_plugins  # a namespace package, absent when no plugin is installed

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    names |= {e.value for e in importlib.metadata.entry_points(group="jax_plugins")}
    return {next((kind for kind in ("cuda", "rocm") if kind in name), name) for name in names}


def workdir_error(path: str) -> str | None:
    """Why `path` cannot be a workdir, or None. Every file of a run goes through etils.epath, which
    speaks gs:// (pl_dpo.workdir.bucket); any other URL would become a local folder named after its scheme."""
    from pl_dpo.workdir import bucket

    scheme = bucket.unsupported_scheme(path)
    if scheme:
        return f"{scheme}:// workdirs are not supported; use a local folder or a gs://bucket/path"
    if bucket.is_bucket(path):
        if not path[len(bucket.SCHEME) :].split("/", 1)[0]:
            return "names no bucket (gs://bucket/path)"
        problem = bucket.bucket_error(path)
        if problem is None and epath.Path(path).is_file():
            return "is an object, not a folder"
        return problem
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    return None


def unwritable(path: str) -> str | None:
    """Makes the workdir `path`; why a run cannot write there (a read-only mount, no permission), or None."""
    from pl_dpo.workdir import bucket

    try:
        epath.Path(path).mkdir(parents=True, exist_ok=True)
        if not bucket.is_bucket(path):
            with tempfile.TemporaryFile(dir=path):  # a file made and removed: what every stage does
                pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


_UNREACHABLE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)


def storage_error(e: BaseException, workdir: str, train_state_bytes: int = 0) -> str | None:
    """The one line for a run ended by its storage (a full disk, a read-only mount, a bucket out of reach), or None. The
    cause is looked for along the exception's chain: libraries (Orbax, TensorStore) wrap it in errors of their
    own, and their messages keep only its text. A full disk's line says how much space one checkpoint takes: the
    largest already written, else `train_state_bytes` (an estimate, when the first save is the one that failed)."""
    seen: list[BaseException] = []
    while e is not None and e not in seen and len(seen) < 20:
        seen.append(e)
        code, text = getattr(e, "errno", None), str(e)
        where = getattr(e, "filename", None) or workdir
        if code == errno.ENOSPC or "No space left on device" in text:
            free = shutil.disk_usage(workdir).free / 2**30 if os.path.isdir(workdir) else float("nan")
            largest = largest_checkpoint_bytes(workdir)
            if largest:
                need = f"; a checkpoint of this run takes {largest / 2**20:.1f} MiB"
            elif train_state_bytes:
                need = f"; a checkpoint of this run takes about {train_state_bytes / 2**20:.1f} MiB"
            else:
                need = ""
            return (
                f"no space left on the device of {where} ({free:.2f} GiB free now{need}); free some space and run "
                "the same command again: it resumes from what is saved"
            )
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text:
            return f"{where}: {os.strerror(code) if code else 'Read-only file system'}"
        if isinstance(e, ConnectionError) or code in _UNREACHABLE:  # a bucket's storage gone (aiohttp's are OSErrors)
            return (
                f"the storage of {workdir} cannot be reached ({type(e).__name__}: {text}); run the same command "
                "again once it can: it resumes from what is saved"
            )
        e = e.__cause__ or e.__context__
    return None


def largest_checkpoint_bytes(workdir: str) -> int:
    """Bytes of the largest checkpoint step folder already in a local workdir (a policy or a train state: what
    each later save writes again), 0 when there is none. The space a full disk needs at least, for the next save."""
    largest = 0
    for root, dirs, _ in os.walk(workdir):
        for step in (d for d in dirs if d.isdigit() and os.path.basename(root) in ("policies", "train")):
            size = 0
            for sub, _, files in os.walk(os.path.join(root, step)):
                size += sum(
                    os.path.getsize(os.path.join(sub, f)) for f in files if not os.path.islink(os.path.join(sub, f))
                )
            largest = max(largest, size)
    return largest


def storage_failed(message: str) -> NoReturn:
    """The run cannot reach or write its storage (`storage_error`, or the bucket lock's watchdog, called from its
    thread while the main thread may wait in a storage client's retries for minutes): one line, and the process
    ends here, as Orbax's background threads would wait out timeouts of their own. Nothing that could be kept is
    lost: what is committed is where the same command resumes."""
    sys.stdout.flush()
    print(f"\nerror: {message}", file=sys.stderr, flush=True)  # after a progress bar's unfinished line
    os._exit(2)


class ReportedByTheRun(logging.Filter):
    """Drops Orbax's log of a storage failure in one of its background threads (a traceback per thread): Orbax
    raises the same error in the main thread at its next save or wait, which says it in one line."""

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (from_orbax and error is not None and storage_error(error, self.workdir) is not None)


def quiet_closed_loop_callbacks(unraisablehook):
    """`sys.unraisablehook` without TensorStore's completion callbacks into an event loop that Orbax closed after a
    failed save (a full disk: a dozen tracebacks of 'Event loop is closed', raised from native code in
    `loop.call_soon_threadsafe`); the failure itself reaches the main thread, which says it in one line.
    Everything else goes to `unraisablehook`."""

    def hook(unraisable) -> None:
        tb, value = unraisable.exc_traceback, unraisable.exc_value
        from_a_callback = tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
        if not (from_a_callback and isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            unraisablehook(unraisable)

    return hook


def user_error(message: str) -> NoReturn:
    """A mistake in what the user gave: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file's own error: its last line
        return f"{lines[0].split(':')[0]}: {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a mistake in a flag or a --config override is one line and exit 2."""
    config_file.make_importable(argv)
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that does not exist
        name = str(e.args[0] if e.args else e).strip("'\"")
        flag = next((a for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")), None)
        where = f" in {flag}" if flag else ""
        user_error(f"the config has no field {name!r}{where} (its fields: configs/common.py:base())")
    except (flags.Error, ValueError, TypeError, OSError) as e:
        user_error(_one_line(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
