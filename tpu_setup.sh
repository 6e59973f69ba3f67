#!/usr/bin/env bash
# Launch a pl_dpo config on a whole Cloud TPU slice from your own machine: create the TPU VM
# (or reuse it), put this repository on every worker, install it there with the tpu extra, and
# start `python -m pl_dpo.main --distributed --workdir=gs://...` on all workers at once. Run it
# with --help for the variables and flags; --dry-run prints every gcloud command instead.
#
# Safe to run twice: an existing TPU is reused (after checking that no pl_dpo run is going on
# there), the venv is kept and `pip install` only adds what is missing, and a run relaunched on
# the same workdir resumes where it stopped.
#
# The same file runs on each worker (`--on-worker`, called by the launcher through ssh), so the
# worker-side setup is ordinary, shellchecked bash rather than a long quoted string.
set -euo pipefail
shopt -s inherit_errexit

PROG=tpu_setup.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Every worker keeps the project in ~/pl_dpo (a fixed name: the launcher empties it before
# unpacking, so it must never be configurable to something like ~) and one log per run in
# ~/pl_dpo/logs, which survives re-shipping.
REMOTE_DIR=pl_dpo
TARBALL=pl_dpo.tar.gz
# Matches the training process (`.venv/bin/python -m pl_dpo.main ...`) but not the ssh shell
# whose own command line contains this pattern: that one starts with "bash".
RUNNING_PATTERN='^[^ ]*python[0-9.]* -m pl_dpo[.]main'

PROJECT_ID=${PROJECT_ID:-}
ZONE=${ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TPU_NAME=${TPU_NAME:-}
BUCKET=${BUCKET:-}
CONFIG=${CONFIG:-}
RUN_NAME=${RUN_NAME:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-origin/HEAD}
PLAN=${PLAN:-0}
DRY_RUN=${DRY_RUN:-0}
ON_WORKER=0
OVERRIDES=()  # --config.key=value: for pl_dpo.main and the planner
MAIN_ARGS=()  # after --: for pl_dpo.main only

USAGE="usage: $PROG --project=P --zone=Z --accelerator-type=T --name=N --bucket=gs://B[/prefix] \
--config=configs/X.py[:arg] [--config.key=value ...] [--plan] [--dry-run] [-- main.py flags]  (--help: all options)"

usage() {
  cat <<EOF
$USAGE

Creates (or reuses) the Cloud TPU VM slice N, copies this repository (git HEAD, as
\`git archive\`; or a clone of --repo-url) to ~/$REMOTE_DIR on every worker, installs it there
in a venv with the tpu extra (pip install -e '.[tpu]'), and starts on all workers at once, in
the background:
    cd ~/$REMOTE_DIR && .venv/bin/python -m pl_dpo.main --distributed --config=CONFIG \\
        --workdir=gs://<bucket>[/prefix]/<run name> [--config.key=value ...]
Each worker logs to ~/$REMOTE_DIR/logs/<run name>.log.

Each setting is an environment variable or the flag next to it (the flag wins):
  PROJECT_ID        --project=P            Google Cloud project (required)
  ZONE              --zone=Z               e.g. us-west4-a (required)
  ACCELERATOR_TYPE  --accelerator-type=T   Cloud TPU's name: v5litepod-16 (v5e), v5p-8, v4-8,
                                           v6e-16 (required)
  TPU_NAME          --name=N               the TPU VM to create or reuse (required)
  BUCKET            --bucket=gs://B[/p]    bucket (and prefix) that holds the workdir (required);
                                           the TPU's service account must be able to write it
  CONFIG            --config=F[:arg]       config file inside this repository, e.g.
                                           configs/spin.py (required)
  RUNTIME_VERSION   --version=V            TPU software version; default by generation:
                                           v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                                           v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v2-v4)
  RUN_NAME          --run-name=R           workdir and log name; default: the config's name
                                           (configs/spin.py:rounds=4 -> spin-rounds-4)
  REPO_URL          --repo-url=URL         git clone this on the workers instead of copying
                                           the local HEAD
  REPO_REF          --ref=REF              what to check out there (default origin/HEAD)
  PLAN=1            --plan                 first run the planner here (\${PYTHON:-python3}
                                           -m pl_dpo.plan --config=CONFIG --topology=T
                                           [--config.key=value ...]) and stop with exit
                                           code 1 if the config does not fit
  DRY_RUN=1         --dry-run              print the gcloud commands instead of running them
  --config.key=value ...                   config overrides, passed on to pl_dpo.main (and
                                           to the planner)
  -- ARGS                                  everything after -- is passed on to pl_dpo.main

Models and datasets are not downloaded here: name them with --config.model.hf_path=...,
--config.data.files.train=..., and so on, as paths every worker can read (its own disk, or a
bucket where pl_dpo reads one). Exit codes: 0 launched, 1 the planner says the
config does not fit / a run is already going on / a gcloud command failed, 2 bad input.

Example (v5e, 16 chips on 4 hosts):
  ./$PROG --project=my-project --zone=us-west4-a --accelerator-type=v5litepod-16 \\
      --name=pl-dpo-v5e --bucket=gs://my-bucket/runs --config=configs/spin.py --plan \\
      --config.model.hf_path=/data/zephyr-7b-sft-full
EOF
}

die() {  # die CODE MESSAGE
  echo "$PROG: $2" >&2
  exit "$1"
}

usage_error() {
  echo "$PROG: $1" >&2
  echo "$USAGE" >&2
  exit 2
}

# One word as a POSIX shell reads it back: left bare when that is safe, else single-quoted.
# Used for the printed commands (copy-pasteable) and for the words of the remote commands,
# which the workers' shells parse again.
quote() {
  local word=$1 q="'"
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

quote_words() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  printf '%s' "${out[*]}"
}

show() {
  printf '+ %s\n' "$(quote_words "$@")"
}

# Print a command, then run it unless this is a dry run.
run() {
  show "$@"
  ((DRY_RUN)) || "$@"
}

note() {
  printf '# %s\n' "$*"
}

set_flag() {  # set_flag --name VALUE
  case $1 in
    --project) PROJECT_ID=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --version | --runtime-version) RUNTIME_VERSION=$2 ;;
    --name) TPU_NAME=$2 ;;
    --bucket) BUCKET=$2 ;;
    --config) CONFIG=$2 ;;
    --run-name) RUN_NAME=$2 ;;
    --repo-url) REPO_URL=$2 ;;
    --ref) REPO_REF=$2 ;;
    *) usage_error "unknown flag $1" ;;
  esac
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --plan) PLAN=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --on-worker) ON_WORKER=1 ;;
      --config.*=*) OVERRIDES+=("$1") ;;
      --config.*) usage_error "write config overrides as $1=VALUE (one word)" ;;
      --) shift; MAIN_ARGS+=("$@"); break ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*) (($# >= 2)) || usage_error "$1 needs a value (or is unknown)"; set_flag "$1" "$2"; shift ;;
      *) usage_error "unexpected argument '$1'" ;;
    esac
    shift
  done
}

require() {  # require VARIABLE --flag
  [[ -n ${!1} ]] || usage_error "missing $1 (set it, or pass $2=...)"
}

# Cloud TPU's recommended software version per generation (cloud.google.com/tpu/docs/runtimes).
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Check every input before any gcloud call, so that a mistake costs nothing.
validate() {
  require PROJECT_ID --project
  require ZONE --zone
  require ACCELERATOR_TYPE --accelerator-type
  require TPU_NAME --name
  require BUCKET --bucket
  require CONFIG --config
  [[ $PLAN =~ ^[01]$ && $DRY_RUN =~ ^[01]$ ]] || usage_error "PLAN and DRY_RUN are 0 or 1 (PLAN=$PLAN DRY_RUN=$DRY_RUN)"
  case $ACCELERATOR_TYPE in
    v5e-*) usage_error "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: Cloud TPU names v5e slices v5litepod-N (e.g. v5litepod-16)" ;;
    [a-z]*[0-9]*-[0-9]*) ;;
    *) usage_error "ACCELERATOR_TYPE=$ACCELERATOR_TYPE is not a Cloud TPU accelerator type (e.g. v5litepod-16, v5p-8, v4-8, v6e-16)" ;;
  esac
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime "$ACCELERATOR_TYPE") \
      || usage_error "no default RUNTIME_VERSION for $ACCELERATOR_TYPE; set it (or pass --version=...)"
  fi
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || usage_error "TPU_NAME=$TPU_NAME: lower-case letters, digits and hyphens, starting with a letter"
  parse_bucket
  case $CONFIG in
    /*) usage_error "CONFIG=$CONFIG: give the config's path inside this repository (e.g. configs/spin.py), as the workers see it" ;;
  esac
  # A typo found here costs nothing; found on the workers, it costs a TPU's start-up. (With
  # --repo-url the workers get another checkout, which may hold other configs.)
  if [[ -z $REPO_URL && ! -f $ROOT/${CONFIG%%:*} ]]; then
    usage_error "CONFIG=$CONFIG: no file ${CONFIG%%:*} in $ROOT"
  fi
  if [[ -z $RUN_NAME ]]; then  # configs/spin.py:rounds=4 -> spin-rounds-4
    local file=${CONFIG%%:*}
    RUN_NAME=${file##*/}
    RUN_NAME=${RUN_NAME%.py}
    [[ $CONFIG == *:* ]] && RUN_NAME+=-${CONFIG#*:}
    RUN_NAME=${RUN_NAME//[^A-Za-z0-9_.-]/-}
  fi
  [[ $RUN_NAME =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || usage_error "RUN_NAME=$RUN_NAME: letters, digits, '_', '.', '-' only"
  WORKDIR=gs://$BUCKET_NAME${BUCKET_PREFIX:+/$BUCKET_PREFIX}/$RUN_NAME
  LOG=logs/$RUN_NAME.log
}

# BUCKET is gs://name[/prefix], or name[/prefix]: checked here, as gcloud would only find a
# mistake once the TPU is up.
parse_bucket() {
  local b=${BUCKET#gs://}
  b=${b%/}
  BUCKET_NAME=${b%%/*}
  BUCKET_PREFIX=
  [[ $b == */* ]] && BUCKET_PREFIX=${b#*/}
  [[ $BUCKET_NAME =~ ^[a-z0-9][a-z0-9._-]*[a-z0-9]$ ]] || usage_error "BUCKET=$BUCKET is not gs://BUCKET[/prefix]"
  [[ -z $BUCKET_PREFIX || $BUCKET_PREFIX =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] \
    || usage_error "BUCKET=$BUCKET: the prefix may hold letters, digits, '_', '.', '-' and '/'"
}

# Ask the planner (run here, not on the TPU) whether the config fits the slice: 0 fits, 1 not.
# It runs in a dry run too: it only compiles, locally, and its answer is what a dry run is for.
plan() {
  local rc=0 cmd
  # The overrides go too: they may change the model, the batch or the lengths, i.e. the fit.
  cmd=("${PYTHON:-python3}" -m pl_dpo.plan --config="$CONFIG" --topology="$ACCELERATOR_TYPE" "${OVERRIDES[@]}")
  show "${cmd[@]}"
  "${cmd[@]}" || rc=$?
  case $rc in
    0) ;;
    1) die 1 "$CONFIG does not fit $ACCELERATOR_TYPE (the planner's report is above); nothing was created or launched" ;;
    *) die "$rc" "the planner failed (exit code $rc); nothing was created or launched" ;;
  esac
}

# Reuse the TPU when describe finds it (and it has the requested shape), else create it.
ensure_tpu() {
  local out state acc describe
  describe=(gcloud "${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state,acceleratorType)')
  show "${describe[@]}"
  if ((DRY_RUN)); then
    note "if describe did not find it:"
    create_tpu
    note "if it found it: stop unless it is idle"
    check_idle
    return
  fi
  # Its errors (not found, but also no permission) are dropped: create repeats them if real.
  if out=$("${describe[@]}" 2>/dev/null); then
    read -r state acc <<<"$out" || true
    if [[ -n ${acc:-} && $acc != "$ACCELERATOR_TYPE" ]]; then
      die 2 "TPU $TPU_NAME exists as $acc, not $ACCELERATOR_TYPE: pass --accelerator-type=$acc, or another --name"
    fi
    echo "TPU $TPU_NAME exists (${state:-state unknown}): reusing it"
    check_idle
  else
    create_tpu
  fi
}

create_tpu() {
  run gcloud "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

# A reused slice may still be training: re-shipping the code under it, or starting a second
# run that cannot get the chips, would only do harm.
check_idle() {
  local check
  check="if pgrep -f $(quote "$RUNNING_PATTERN") >/dev/null; then echo \"\$(hostname): pl_dpo.main is running\" >&2; exit 1; fi"
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$check" \
    || die 1 "a pl_dpo run is still going on $TPU_NAME (or ssh failed, see above); follow it with: $(follow_command 0 'tail -f')
or stop it (it saves and exits) with: $(ssh_line all "pkill -f 'pl_dpo[.]main'")"
}

# Put the project on every worker: the committed HEAD as a tarball (scp), or a git clone.
ship_and_install() {
  local setup worker_setup
  worker_setup="bash $REMOTE_DIR/tpu_setup.sh --on-worker"
  if [[ -n $REPO_URL ]]; then
    setup="set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; \
else git clone -q $(quote "$REPO_URL") $REMOTE_DIR; fi; git -C $REMOTE_DIR checkout -q --detach $(quote "$REPO_REF"); $worker_setup"
  else
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: $tmp is local
    trap "rm -rf '$tmp'" EXIT
    make_tarball "$tmp/$TARBALL"
    run gcloud "${TPU[@]}" scp "$tmp/$TARBALL" "$TPU_NAME:$TARBALL" "${WHERE[@]}" --worker=all
    # Empty the folder first (files deleted from the repository must go too), keeping the venv
    # (so a second run installs nothing new) and the logs.
    setup="set -e; mkdir -p $REMOTE_DIR; find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs \
-exec rm -rf {} +; tar -xzf $TARBALL -C $REMOTE_DIR; rm -f $TARBALL; $worker_setup"
  fi
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$setup"
}

make_tarball() {
  local out=$1
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --no-optional-locks: read-only, never takes the index lock from someone working here.
    if [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain --untracked-files=no) ]]; then
      echo "$PROG: warning: uncommitted changes are not shipped; the workers get HEAD $(git -C "$ROOT" rev-parse --short HEAD)" >&2
    fi
    run git -C "$ROOT" archive --format=tar.gz -o "$out" HEAD
  else
    run tar -czf "$out" -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs \
      --exclude=__pycache__ --exclude='*.egg-info' .
  fi
}

launch() {
  local main cmd
  main=(.venv/bin/python -m pl_dpo.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}" "${MAIN_ARGS[@]}")
  # Only the python process goes to the background, with every stream redirected, so that the
  # ssh session (and this script) returns while it runs; nohup keeps it alive after the hang-up.
  cmd="set -e; cd $REMOTE_DIR; mkdir -p logs; PYTHONUNBUFFERED=1 nohup $(quote_words "${main[@]}") \
>$LOG 2>&1 </dev/null & echo \"\$(hostname): started, workdir $WORKDIR, log ~/$REMOTE_DIR/$LOG\""
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$cmd"
}

ssh_line() {  # ssh_line WORKER COMMAND: a copy-pasteable gcloud ssh line
  quote_words gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

follow_command() {  # follow_command WORKER TAIL-COMMAND
  ssh_line "$1" "$2 $REMOTE_DIR/$LOG"
}

report() {
  local verb=Launched
  ((DRY_RUN)) && verb="Dry run: would launch"
  cat <<EOF

$verb $CONFIG on every worker of $TPU_NAME ($ACCELERATOR_TYPE).
Workdir: $WORKDIR
Follow worker 0:     $(follow_command 0 'tail -f')
Last lines, all:     $(follow_command all 'tail -n 3')
Stop (saves, exits): $(ssh_line all "pkill -f 'pl_dpo[.]main'")
Delete the TPU:      $(quote_words gcloud "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}")
EOF
}

# ---- on each worker (called through ssh by the launcher) ----

PY_OK='import sys; sys.exit(sys.version_info < (3, 11))'

# pl_dpo needs Python >= 3.11; the TPU VM images (Ubuntu 22.04) ship 3.10.
pick_python() {
  local c
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c "$PY_OK" 2>/dev/null; then
      echo "$c"
      return
    fi
  done
  sudo apt-get update -qq >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv >&2
  echo python3.11
}

worker_setup() {
  cd "$ROOT"
  if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c "$PY_OK"; then
    rm -rf .venv  # made by an older setup with the system's Python 3.10
  fi
  if [[ ! -x .venv/bin/python ]]; then
    local py
    py=$(pick_python)
    "$py" -m venv .venv
  fi
  .venv/bin/pip install -q --upgrade pip
  # The tpu extra pulls jax[tpu] (libtpu) from PyPI; an unchanged install is a no-op.
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -c 'import jax, pl_dpo; print("pl_dpo installed, jax", jax.__version__)'
  echo "$(hostname): ready"
}

main() {
  parse_args "$@"
  if ((ON_WORKER)); then
    worker_setup
    return
  fi
  validate
  if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die 2 "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
  fi
  TPU=(compute tpus tpu-vm)
  WHERE=(--zone="$ZONE" --project="$PROJECT_ID")
  ((PLAN)) && { cd "$ROOT"; plan; }
  ensure_tpu
  ship_and_install
  launch
  report
}

main "$@"
