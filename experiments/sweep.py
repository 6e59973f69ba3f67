"""Run a config's sweep: one `python -m pl_dpo.main` job per override dict of its `sweep()`.

    .venv/bin/python experiments/sweep.py --config=configs/study.py             # locally, job after job
    .venv/bin/python experiments/sweep.py --config=configs/study.py --quick     # the tiny CI variant
    .venv/bin/python experiments/sweep.py --config=configs/study.py --print \
        --sweep_dir=/mnt/shared/study                                          # one command per job

Each job gets its own workdir `<sweep_dir>/<name>`, the name built from its overrides
(`loss.T=0.1__seed=1`). A job whose workdir holds results.md is finished and skipped; an
interrupted one is rerun on the same workdir and the main job resumes it by itself.

Shared work: before a job starts on an empty workdir, the deterministic stages that an
earlier job of the same sweep already finished under identical settings (same seed and
the same tokenizer / data / model / SFT / assistant sections, STAGE_KEYS) are copied in:
the tokenizer, the built dataset, πθ(0) with its evaluation, and each assistant with its
cached samples. The rounds themselves are never shared. `--print` runs nothing and
shares nothing: each printed command does all of its own work (for a fleet of machines).

Per-job wall time, return code and which stages were copied go to `<sweep_dir>/sweep_log.jsonl`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `configs.*` imports inside config files

from tqdm import tqdm  # noqa: E402

from pl_dpo.config_lib import apply_overrides, lookup, plain  # noqa: E402
from pl_dpo.workdir import layout as wd  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Config fields each deterministic stage depends on (pl_dpo.workdir.layout.STAGE_FIELDS): a stage is copied
# only when all of them agree, the mesh too (shared work must be bit-identical), and for πθ(0),
# copied with its evaluation, the evaluation settings.
STAGE_KEYS = {
    "tokenizer": wd.STAGE_FIELDS["tokenizer"],
    "tfds": wd.STAGE_FIELDS["tfds"],
    "sft": wd.STAGE_FIELDS["sft"] + wd.EVAL_FIELDS + wd.NUMERICS_FIELDS,
    "assistant": wd.STAGE_FIELDS["assistant"] + wd.NUMERICS_FIELDS,  # + assistants[i]
}


# ------------------------------------------------------------------------------ configs and jobs


def load_module(path: str) -> ModuleType:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "sweep", None)):
        raise AttributeError(f"{path} defines no sweep() (every experiment config must)")
    return module


def sweep_jobs(module: ModuleType, arg: str | None) -> list[dict[str, Any]]:
    """The config's override dicts; `sweep(arg)` when sweep takes an argument, else `sweep()`."""
    takes_arg = len(inspect.signature(module.sweep).parameters) > 0
    jobs = module.sweep(arg) if takes_arg else module.sweep()
    if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise TypeError(f"sweep() must return a list of dicts, got {type(jobs).__name__}")
    return jobs


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_fmt(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def job_name(overrides: dict[str, Any]) -> str:
    """A folder name from the overrides, e.g. `loss.T=0.1__modes=spin+asft__seed=1` ("base" if none)."""
    parts = [f"{k}={_fmt(v)}" for k, v in sorted(overrides.items())]
    name = "__".join(parts).replace(",", "+").replace("/", "_").replace(" ", "")
    return name or "base"


def job_argv(config_spec: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pl_dpo.main",
        f"--config={config_spec}",
        f"--workdir={workdir}",
        *(f"--config.{k}={_fmt(v)}" for k, v in overrides.items()),
    ]


def print_command(config_spec: str, workdir: str, overrides: dict[str, Any]) -> str:
    argv = ["python", *job_argv(config_spec, workdir, overrides)[1:]]
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------ sharing stages


def _same(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    canon = lambda d, k: json.dumps(lookup(d, k), sort_keys=True, default=str)  # tuple == list
    return all(canon(a, k) == canon(b, k) for k in keys)


def _copy(src: str, dst: str) -> None:
    """Copy a file or folder so that `dst` appears whole or not at all."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.copying-{os.getpid()}"
    if os.path.isdir(src):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def seed_from_donors(workdir: str, config: dict[str, Any], donors: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Copy into an unstarted `workdir` the stages finished by an earlier job with the same settings."""
    if os.path.exists(os.path.join(workdir, "config.json")):
        return []  # started already: the job resumes its own work
    copied: list[str] = []
    sft_record = None
    for donor, dcfg in donors:

        def have(rel: str) -> bool:
            return os.path.exists(os.path.join(donor, rel)) and not os.path.exists(os.path.join(workdir, rel))

        if have("tokenizer/tokenizer.json") and _same(config, dcfg, STAGE_KEYS["tokenizer"]):
            _copy(os.path.join(donor, "tokenizer"), os.path.join(workdir, "tokenizer"))
            copied.append("tokenizer")
        if have("tfds") and _same(config, dcfg, STAGE_KEYS["tfds"]):
            _copy(os.path.join(donor, "tfds"), os.path.join(workdir, "tfds"))
            copied.append("tfds")
        if (
            wd.policy_committed(donor, "sft", 0)
            and not os.path.exists(wd.policy_dir(workdir, "sft", 0))
            and os.path.exists(wd.eval_path(donor, "sft", 0))
            and _same(config, dcfg, STAGE_KEYS["sft"])
        ):
            _copy(wd.policy_dir(donor, "sft", 0), wd.policy_dir(workdir, "sft", 0))
            _copy(wd.eval_path(donor, "sft", 0), wd.eval_path(workdir, "sft", 0))
            sft_record = _sft_eval_record(donor)
            copied.append("sft")
        for i, assistant in enumerate(config.get("assistants") or []):
            rel = f"assistant_{i}"
            theirs = dcfg.get("assistants") or []
            if (
                i < len(theirs)
                and have(f"{rel}/samples.npz")
                and _same(config, dcfg, STAGE_KEYS["assistant"])
                and json.dumps(assistant, sort_keys=True) == json.dumps(theirs[i], sort_keys=True)
            ):
                for part in ("policies/0", "samples.npz"):
                    if os.path.exists(os.path.join(donor, rel, part)):
                        _copy(os.path.join(donor, rel, part), os.path.join(workdir, rel, part))
                copied.append(rel)
    if sft_record is not None:  # so the job's own metrics.jsonl holds every evaluation
        with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(sft_record) + "\n")
    return copied


def _sft_eval_record(donor: str) -> dict[str, Any] | None:
    path = os.path.join(donor, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if '"eval/sft"' in line:
                    rec = json.loads(line)
                    if rec.get("phase") == "eval/sft" and rec.get("step") == 0:
                        return rec
    return None


def _finished_jobs(sweep_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """Finished workdirs already in the sweep dir (possibly of another config's sweep): donors too."""
    out = []
    for cfg_path in sorted(glob.glob(os.path.join(sweep_dir, "*", "config.json"))):
        job = os.path.dirname(cfg_path)
        if os.path.exists(os.path.join(job, "results.md")):
            out.append((job, wd.read_config_json(cfg_path)))
    return out


# ------------------------------------------------------------------------------ running


def run_sweep(config_path: str, arg: str | None, sweep_dir: str, *, dry_print: bool = False, share: bool = True) -> int:
    module = load_module(config_path)
    jobs = sweep_jobs(module, arg)
    spec = config_path + (f":{arg}" if arg else "")
    base = module.get_config(arg) if arg else module.get_config()
    # Resolve every job's config first: a bad override fails here, before anything runs.
    resolved = [plain(apply_overrides(base, o)) for o in jobs]
    names = [job_name(o) for o in jobs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"sweep() of {config_path} has duplicate jobs: {sorted(n for n in names if names.count(n) > 1)}"
        )
    if dry_print:
        for name, o in zip(names, jobs):
            print(print_command(spec, os.path.join(sweep_dir, name), o))
        return 0
    os.makedirs(sweep_dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failed, donors = [], _finished_jobs(sweep_dir) if share else []
    start = time.time()
    with tqdm(total=len(jobs), desc="sweep", unit="job") as bar:
        for name, overrides, cfg in zip(names, jobs, resolved):
            workdir = os.path.join(sweep_dir, name)
            bar.set_postfix_str(name)
            if os.path.exists(os.path.join(workdir, "results.md")):
                bar.update(1)
                continue
            os.makedirs(workdir, exist_ok=True)
            copied = seed_from_donors(workdir, cfg, donors) if share else []
            t0 = time.time()
            with open(os.path.join(workdir, "job.log"), "a", encoding="utf-8") as log:
                rc = subprocess.call(
                    job_argv(spec, workdir, overrides), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            seconds = time.time() - t0
            with open(os.path.join(sweep_dir, "sweep_log.jsonl"), "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "job": name,
                            "overrides": overrides,
                            "rc": rc,
                            "seconds": round(seconds, 1),
                            "copied": copied,
                            "end": time.time(),
                        }
                    )
                    + "\n"
                )
            if rc == 0:
                donors.append((workdir, cfg))
            else:
                failed.append(name)
                tqdm.write(f"job {name} failed (rc={rc}); see {workdir}/job.log")
            bar.update(1)
    print(
        f"sweep: {len(jobs) - len(failed)}/{len(jobs)} jobs finished in {time.time() - start:.0f} s "
        f"({sweep_dir}/sweep_log.jsonl)"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file defining get_config() and sweep()")
    p.add_argument("--config_arg", default=None, help="argument of get_config()/sweep() (e.g. quick)")
    p.add_argument("--quick", action="store_true", help="the tiny variant: --config_arg=quick")
    p.add_argument("--sweep_dir", default=None, help="parent of the job workdirs (default runs/<config>[_quick])")
    p.add_argument("--print", dest="dry_print", action="store_true", help="print one command per job, run nothing")
    p.add_argument("--no_share", action="store_true", help="do not copy finished stages between jobs")
    args = p.parse_args(argv)
    arg = "quick" if args.quick else args.config_arg
    stem = os.path.splitext(os.path.basename(args.config))[0]
    sweep_dir = args.sweep_dir or os.path.join("runs", stem + (f"_{arg}" if arg else ""))
    return run_sweep(args.config, arg, sweep_dir, dry_print=args.dry_print, share=not args.no_share)


if __name__ == "__main__":
    sys.exit(main())
