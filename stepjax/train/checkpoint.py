"""Checkpoints: orbax `CheckpointManager` directories holding a TrainState and JSON metadata.

Saves are asynchronous and keep the last k; they are atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames
it when complete, so a save killed mid-write is never restored. Restores go straight into the shardings of a target
(an abstract state on a mesh, or the first device).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from stepjax import checks
from stepjax.train.state import TrainState, default_sharding

_STATE_ITEM, _EXTRA_ITEM = "state", "extra"


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """A writer: keeps the last `max_to_keep` checkpoints (None keeps all) and saves in a background thread.

  Leftover `*.orbax-checkpoint-tmp*` directories of an interrupted run are removed in the background when it
  opens (at the latest before its first save). Call `manager.wait_until_finished()` (or `manager.close()`) before
  the process exits.
  """
  if max_to_keep is not None:
    checks.check_int(max_to_keep, "checkpoint.max_to_keep", 1)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=(_STATE_ITEM, _EXTRA_ITEM))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None,
                    extra_metadata: Mapping[str, Any] | None = None) -> bool:
  """Starts saving `state` as checkpoint `step` (default: state.step) with JSON `extra_metadata`.

  Asynchronous when the manager is: the device arrays are copied to host before this returns, so the next
  (donating) update may run at once. Returns whether a save was started.
  """
  step = int(np.asarray(state.step)) if step is None else int(step)
  extra = dict(extra_metadata or {})
  try:
    json.dumps(extra)
  except TypeError as error:
    raise ValueError(f"checkpoint.extra_metadata: must be JSON-serializable ({error})") from None
  return manager.save(step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                                       _EXTRA_ITEM: ocp.args.JsonSave(extra)}))


def _abstract_leaf(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def abstract_state(state: TrainState) -> TrainState:
  """ShapeDtypeStructs (with the shardings of device arrays) of a state: a restore target for `restore_checkpoint`."""
  return jax.tree.map(_abstract_leaf, state)


def _with_sharding(abstract: Any) -> Any:
  """Concrete leaves become ShapeDtypeStructs; leaves without a sharding (host arrays, `jax.eval_shape` output)
  restore onto the first device."""
  default = default_sharding()

  def fill(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      x = _abstract_leaf(x)
    if x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree.map(fill, abstract)


def _reader(directory_or_manager) -> tuple[ocp.CheckpointManager, bool]:
  if isinstance(directory_or_manager, ocp.CheckpointManager):
    directory_or_manager.wait_until_finished()  # a save of this manager may still be in flight
    return directory_or_manager, False
  path = os.path.abspath(os.fspath(directory_or_manager))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint.directory: {path} does not exist")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(path, options=options, item_names=(_STATE_ITEM, _EXTRA_ITEM)), True


def _checkpoint_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  steps = manager.all_steps()  # finalized checkpoints only: orbax never lists a tmp directory
  if not steps:
    raise FileNotFoundError(f"checkpoint.directory: {manager.directory} holds no complete checkpoint")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"checkpoint.step: {step} is not a complete checkpoint in {manager.directory}; "
                            f"available: {sorted(steps)}")
  return int(step)


def restore_checkpoint(directory_or_manager, abstract: TrainState, step: int | None = None) -> tuple[TrainState, int]:
  """Restores the latest complete checkpoint (or `step`) into the structure, dtypes and shardings of `abstract`.

  abstract: a TrainState of ShapeDtypeStructs (`abstract_state(state)`, or `jax.eval_shape` of an init; leaves
    without a sharding land on the first device) or a concrete state used as the template.
  Raises FileNotFoundError "checkpoint.directory: ... does not exist" / "... holds no complete checkpoint".
  """
  manager, owned = _reader(directory_or_manager)
  try:
    step = _checkpoint_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{_STATE_ITEM: ocp.args.StandardRestore(_with_sharding(abstract))}))
    return restored[_STATE_ITEM], step
  finally:
    if owned:
      manager.close()


def checkpoint_metadata(directory_or_manager, step: int | None = None) -> dict:
  """The `extra_metadata` saved with the latest complete checkpoint (or `step`)."""
  manager, owned = _reader(directory_or_manager)
  try:
    step = _checkpoint_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(**{_EXTRA_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[_EXTRA_ITEM] or {})
  finally:
    if owned:
      manager.close()
