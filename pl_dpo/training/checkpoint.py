"""Thin Orbax wrapper: the policies of a lineage and a phase's mid-phase train state (saved on preemption too).

Where they live in a workdir (`pl_dpo.workdir.layout`, docs/ARCHITECTURE.md "Workdir layout"):

    <lineage>/policies/<t>/   a policy: items `layout.POLICY_ITEMS`, the weights and a JSON record (PolicyCheckpoints)
    <phase>/train/<step>/     a phase's mid-phase state: `TrainCheckpoints.ITEMS`, the weights, the optimizer state
                              and the loop's own record (data position, early stopping); <phase> is `sft`,
                              `assistant_<i>` or `<mode>/round_<t>`

Atomicity: Orbax writes `<step>.orbax-checkpoint-tmp-<ts>/` and renames it
on commit (local/NFS), or writes `commit_success.txt` (GCS, through TensorStore). Before each save
a bucket workdir's metric log is uploaded (`bucket.before_commit`). On top of that a step is
taken as committed only if its `_CHECKPOINT_METADATA` carries a commit timestamp and
every item directory exists; anything else found at start-up is renamed aside to
`<step>.incomplete-<ts>` (never deleted) so that it can neither be restored nor block
later saves.

States are nnx.State or plain pytrees; nnx.State is stored as its pure dict, so the
files do not depend on nnx Variable classes. Restores go *onto the given shardings*:
the target leaves are ShapeDtypeStructs with `.sharding` (see sharding.with_shardings)
or jax.Arrays whose sharding is reused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from pl_dpo.sharding import path_to_str
from pl_dpo.training.preemption import Preemption
from pl_dpo.workdir import bucket
from pl_dpo.workdir.layout import POLICY_ITEMS, step_committed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- state <-> files


def _to_saveable(state: Any) -> Any:
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def _restore_target(state: Any, what: str) -> Any:
    """Pure pytree of ShapeDtypeStructs, each with the sharding it must be restored onto."""
    pure = _to_saveable(state)

    def one(path, leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"{what}: restore target {path_to_str(path)!r} has no sharding; pass ShapeDtypeStructs "
                "with .sharding (pl_dpo.sharding.with_shardings) or jax.Arrays"
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, pure)


def _from_restored(target: Any, restored: Any) -> Any:
    if isinstance(target, nnx.State):
        out = jax.tree.map(lambda x: x, target)  # a copy: do not mutate the caller's target
        nnx.replace_by_pure_dict(out, restored)
        return out
    return restored


def _set_aside_incomplete(directory: epath.Path, items: Sequence[str]) -> None:
    """Rename step dirs Orbax would list but that are not fully committed (primary only)."""
    if jax.process_index() == 0 and directory.exists():
        for step_dir in directory.iterdir():
            # Plain `<step>` names only: Orbax's own `*.orbax-checkpoint-tmp*` dirs are
            # never listed as steps and are removed by cleanup_tmp_directories.
            if step_dir.name.isdigit() and step_dir.is_dir() and not step_committed(step_dir, items):
                aside = directory / f"{step_dir.name}.incomplete-{time.time_ns()}"
                log.warning("checkpoint %s is not committed; moved aside to %s", step_dir, aside)
                step_dir.rename(aside)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pl_dpo_checkpoint_scan:{directory}")


def _manager(directory: epath.Path, items: Sequence[str], *, max_to_keep: int | None, async_save: bool):
    _set_aside_incomplete(directory, items)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a killed save
        create=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=tuple(items))


# ----------------------------------------------------------------------------- round policies


class PolicyCheckpoints:
    """The policies of one lineage (`layout.policies_dir`), one step per index, kept forever: πθ(0) of `sft`,
    an assistant, or πθ(t) of a mode (the reference of round t and a result)."""

    ITEMS = POLICY_ITEMS

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(directory)
        self._mngr = _manager(self.directory, self.ITEMS, max_to_keep=None, async_save=False)

    def save(self, round_idx: int, params_state: Any, metadata: Mapping[str, Any]) -> None:
        if round_idx in self.all_rounds():
            raise FileExistsError(f"round {round_idx} policy already saved in {self.directory}")
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_to_saveable(params_state)),
            metadata=ocp.args.JsonSave(dict(metadata)),
        )
        bucket.before_commit()
        self._mngr.save(round_idx, args=args, force=True)
        self._mngr.wait_until_finished()

    def restore(self, round_idx: int, abstract_state: Any) -> Any:
        """The round's policy placed on `abstract_state`'s shardings (same container type)."""
        self._require(round_idx)
        target = _restore_target(abstract_state, f"round {round_idx}")
        out = self._mngr.restore(round_idx, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return _from_restored(abstract_state, out["params"])

    def metadata(self, round_idx: int) -> dict[str, Any]:
        self._require(round_idx)
        out = self._mngr.restore(round_idx, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(out["metadata"])

    def latest_round(self) -> int | None:
        return self._mngr.latest_step()

    def all_rounds(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def _require(self, round_idx: int) -> None:
        if round_idx not in self.all_rounds():
            raise FileNotFoundError(
                f"no committed policy for round {round_idx} in {self.directory} (have {self.all_rounds()})"
            )

    def close(self) -> None:
        self._mngr.close()


# ----------------------------------------------------------------------------- train state


class TrainCheckpoints:
    """Mid-round train state every `save_every_steps` steps, on request and on SIGTERM.

    Train loop contract:

        ckpt = TrainCheckpoints(dir, save_every_steps=100)
        ckpt.install_sigterm_handler()
        restored = ckpt.restore_latest(abstract_params, abstract_opt_state)
        for step in range(start, n_steps):
            ... one step ...
            if ckpt.should_save(step + 1):   # optional: e.g. check the loss is finite first
                ...
            ckpt.maybe_save(step + 1, params, opt_state, {"data_pos": ..., "seed": ...})
            if ckpt.preemption.should_exit:
                break
        ckpt.maybe_save(n_steps, ..., force=True); ckpt.close()

    `step` is the number of completed steps. Saves are async (the device->host copy
    happens before maybe_save returns, so donating the buffers afterwards is safe).
    """

    ITEMS = ("params", "opt_state", "extra")

    def __init__(
        self,
        directory: str | os.PathLike,
        save_every_steps: int,
        max_to_keep: int = 2,
        async_save: bool = True,
    ):
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
        self.directory = epath.Path(directory)
        self.save_every_steps = save_every_steps
        self.preemption = Preemption()
        self._decided: tuple[int, bool] | None = None  # (step, preemption reached at it)
        self._mngr = _manager(self.directory, self.ITEMS, max_to_keep=max_to_keep, async_save=async_save)

    def install_sigterm_handler(self) -> None:
        """SIGTERM -> save at the next step boundary, then `preemption.should_exit` (see Preemption)."""
        self.preemption.install_sigterm_handler()

    def should_save(self, step: int, force: bool = False) -> bool:
        """Whether maybe_save(step) will save: interval, forced, or preemption.

        Lets the loop do work that must precede a save (e.g. read metrics and stop
        on a NaN) only when one is due. Call it at most once per step (multi-process
        preemption is a per-step protocol); maybe_save reuses its answer.
        """
        if self._decided is None or self._decided[0] != step:
            self._decided = (step, self.preemption.reached(step))
        preempt = self._decided[1]
        return force or preempt or step % self.save_every_steps == 0

    def maybe_save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        extra_json: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Save if `step` is on the interval, forced, or a preemption was requested.

        Returns whether a save was started (False if `step` is already saved).
        """
        if not self.should_save(step, force):
            return False
        preempt = self._decided[1]
        if step == self._mngr.latest_step():  # already saved this exact state
            saved = False
        else:
            bucket.before_commit()
            args = ocp.args.Composite(
                params=ocp.args.StandardSave(_to_saveable(params)),
                opt_state=ocp.args.StandardSave(_to_saveable(opt_state)),
                extra=ocp.args.JsonSave({**dict(extra_json), "step": step}),
            )
            saved = self._mngr.save(step, args=args, force=True)
        if preempt:
            self._mngr.wait_until_finished()
            self.preemption.saved_step = step
        return saved

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore_latest(
        self, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, params, opt_state, extra_json) of the newest committed step that restores, or None.

        A step whose files fail to restore (truncated, zeroed, deleted, undecodable) or hold a
        non-finite value is moved aside to `<step>.damaged-<ts>` (kept, logged) and the step before
        it is tried: a run resumes from its last good state and ends as an uninterrupted one would."""
        params_target = _restore_target(abstract_params, "train params")
        opt_target = _restore_target(abstract_opt_state, "train opt_state")
        for step in sorted(self._mngr.all_steps(), reverse=True):
            args = ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target),
                opt_state=ocp.args.StandardRestore(opt_target),
                extra=ocp.args.JsonRestore(),
            )
            try:
                out = self._mngr.restore(step, args=args)
                finite = all(
                    bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves((out["params"], out["opt_state"]))
                )
                if not finite:
                    raise ValueError("non-finite values")
            except Exception as e:  # noqa: BLE001 - any failure to read a step means the step is unusable
                self._set_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                continue
            params = _from_restored(abstract_params, out["params"])
            opt_state = _from_restored(abstract_opt_state, out["opt_state"])
            extra = dict(out["extra"])
            extra.pop("step", None)
            return step, params, opt_state, extra
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        if jax.process_index() == 0:
            aside = self.directory / f"{step}.damaged-{time.time_ns()}"
            log.warning(
                "train state %s/%d does not restore (%s); moved aside to %s", self.directory, step, reason, aside
            )
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"pl_dpo_checkpoint_aside:{self.directory}/{step}")
        self._mngr.reload()

    def wait_until_finished(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self.preemption.restore_handler()
        self._mngr.wait_until_finished()
        self._mngr.close()
