"""Checkpoints: orbax `CheckpointManager` directories holding a TrainState and JSON metadata.

Saves are asynchronous and keep the last k; they are atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames
it when complete, so a save killed mid-write is never restored. Restores go straight into the shardings of a target
(an abstract state on a mesh, or the first device).

Failures are one line each. A save that cannot be written (a full or read-only disk) raises `CheckpointWriteError`
("checkpoint: cannot write to <dir>: No space left on device; the previous checkpoint (step N) is intact"), from
`save_checkpoint` or `finish_saves`, whichever meets it first (an asynchronous save fails in the background). A resume
takes the newest checkpoint that reads back whole (`restore_usable_checkpoint`) and names every newer damaged one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from stepjax import checks
from stepjax import sharding as sharding_lib
from stepjax.train.state import TrainState, default_sharding

_STATE_ITEM, _EXTRA_ITEM = "state", "extra"
DAMAGED_SUFFIX = ".damaged"  # a damaged step directory set aside by a resume: <step>.damaged (orbax ignores it)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message is one line naming the directory and the intact checkpoint."""


class _QuietOrbaxErrors(logging.Filter):
  """Drops orbax's error records (tracebacks from its background save threads: `save_checkpoint` and `finish_saves`
  raise the same failure again as one `CheckpointWriteError` line) and its warning that a reader is read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return False
    return not str(record.msg).startswith("Given directory is read only")


_QUIET = _QuietOrbaxErrors()


def _orbax_leftover(unraisable) -> bool:
  """An exception Python could not raise anywhere, left by the threads and coroutines of a failed save or restore
  (after its error was raised once): TensorStore completing on a closed event loop, or an abandoned orbax coroutine."""
  error, obj = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_orbax() -> None:
  """Installs (once) the log filter and an unraisable-exception hook that drop orbax's leftovers of a failure this
  module raises as one line; everything else passes through."""
  absl_logger = logging.getLogger("absl")
  if _QUIET not in absl_logger.filters:
    absl_logger.addFilter(_QUIET)
  if not getattr(sys.unraisablehook, "_stepjax_quiet", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _orbax_leftover(unraisable):
        previous(unraisable)

    hook._stepjax_quiet = True
    sys.unraisablehook = hook


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """A writer: keeps the last `max_to_keep` checkpoints (None keeps all) and saves in a background thread.

  Leftover `*.orbax-checkpoint-tmp*` directories of an interrupted run are removed in the background when it
  opens (at the latest before its first save). Call `finish_saves(manager)` before the process exits.
  """
  if max_to_keep is not None:
    checks.check_int(max_to_keep, "checkpoint.max_to_keep", 1)
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=True)
  path = os.path.abspath(os.fspath(directory))
  try:
    return ocp.CheckpointManager(path, options=options, item_names=(_STATE_ITEM, _EXTRA_ITEM))
  except OSError as error:
    raise _write_error(path, error) from None


def _short(text: str, limit: int = 200) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(error: BaseException, *, prefer_os: bool) -> str:
  """A short cause for `error`: the OS error behind it (its strerror) when `prefer_os` and there is one, else the
  innermost message of the exception chain, without TensorStore's spec dump."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  if prefer_os:
    for e in chain:
      if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
      code = re.search(r"os_error_code='(\d+)'", str(e))
      if code:
        return os.strerror(int(code.group(1)))
  for e in reversed(chain):
    text = str(e).strip()
    if text:
      text = text.split(" [tensorstore_spec=")[0].split(". See full TensorStore details")[0]
      text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
      return _short(f"{type(e).__name__}: {text}" if isinstance(e, OSError) and not e.errno else text)
  return type(chain[0]).__name__


def _finalized_steps(path: str) -> list[int]:
  """Step directories on disk (orbax's own names: digits only; tmp and set-aside directories are not steps)."""
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit() and os.path.isdir(os.path.join(path, name)))


def _write_error(path: str, error: BaseException) -> CheckpointWriteError:
  steps = _finalized_steps(path)
  intact = f"the previous checkpoint (step {steps[-1]}) is intact" if steps else "no earlier checkpoint exists"
  return CheckpointWriteError(f"checkpoint: cannot write to {path}: {_reason(error, prefer_os=True)}; {intact}")


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None,
                    extra_metadata: Mapping[str, Any] | None = None) -> bool:
  """Starts saving `state` as checkpoint `step` (default: state.step) with JSON `extra_metadata`.

  Asynchronous when the manager is: the device arrays are copied to host before this returns, so the next
  (donating) update may run at once. Returns whether a save was started (orbax skips a step at or below the latest
  one in the directory). A failed write, this one's or an earlier asynchronous one's, is a `CheckpointWriteError`.
  """
  step = int(np.asarray(state.step)) if step is None else int(step)
  extra = dict(extra_metadata or {})
  try:
    json.dumps(extra)
  except TypeError as error:
    raise ValueError(f"checkpoint.extra_metadata: must be JSON-serializable ({error})") from None
  directory = os.fspath(manager.directory)
  try:
    _probe(directory)
    return manager.save(step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                                         _EXTRA_ITEM: ocp.args.JsonSave(extra)}))
  except Exception as error:  # noqa: BLE001 (orbax and TensorStore raise OSError, ValueError or plain Exception)
    raise _write_error(directory, error) from None


def _probe(directory: str) -> None:
  """Raises the OSError of a directory that takes no new entry (read-only, no permission, no inode left). orbax meets
  it only after starting its background threads, which then wait minutes for a signal that never comes (and hold up
  the interpreter's exit)."""
  fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
  os.close(fd)
  os.remove(probe)


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the manager's asynchronous saves and closes it; a failed write is one `CheckpointWriteError` line."""
  try:
    manager.wait_until_finished()
  except Exception as error:  # noqa: BLE001
    raise _write_error(os.fspath(manager.directory), error) from None
  finally:
    try:
      manager.close()
    except Exception:  # noqa: BLE001 (the failure, if any, was raised above)
      pass


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
  _quiet_orbax()
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


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
  """The complete checkpoints' steps in `directory`, oldest first. Raises FileNotFoundError (one line) when the
  directory does not exist or holds no complete checkpoint: nothing to resume."""
  manager, _ = _reader(directory)
  try:
    _checkpoint_step(manager, None)
    return sorted(int(step) for step in manager.all_steps())
  finally:
    manager.close()


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


def restore_usable_checkpoint(directory: str | os.PathLike, abstract: TrainState, *,
                              print_fn: Callable[[str], None] = print) -> tuple[TrainState, int, dict]:
  """The newest checkpoint whose state and metadata both read back whole -> (state, step, extra_metadata).

  Each newer, damaged checkpoint (a file missing or truncated, unreadable metadata) is named with its reason in one
  print_fn line ("resume: checkpoint 6 is damaged (<reason>); resuming from checkpoint 4") and set aside as
  `<step>.damaged`, so that the resumed run can save that step again. Raises FileNotFoundError (one line naming the
  directory and each reason) when no checkpoint is usable; nothing is set aside then.
  """
  path = os.path.abspath(os.fspath(directory))
  manager, _ = _reader(path)
  damaged = []
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    _checkpoint_step(manager, None)
    for step in steps:
      try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(_with_sharding(abstract)), _EXTRA_ITEM: ocp.args.JsonRestore()}))
        state, extra = restored[_STATE_ITEM], restored[_EXTRA_ITEM]
        if not isinstance(extra, dict):
          raise ValueError(f"its metadata is {type(extra).__name__}, not a JSON object")
        break
      except Exception as error:  # noqa: BLE001 (TensorStore and orbax raise many kinds; each is a damaged step)
        damaged.append((int(step), _reason(error, prefer_os=False)))
    else:
      reasons = "; ".join(f"checkpoint {s}: {reason}" for s, reason in damaged)
      raise FileNotFoundError(f"checkpoint.directory: {path} holds no usable checkpoint ({reasons})")
  finally:
    manager.close()
  if damaged:
    if jax.process_index() == 0:  # one process moves the shared directory's entries; the others wait for it
      for s, _ in damaged:
        aside = os.path.join(path, f"{s}{DAMAGED_SUFFIX}")
        shutil.rmtree(aside, ignore_errors=True)  # an older set-aside copy of the same step
        os.replace(os.path.join(path, str(s)), aside)
    sharding_lib.sync_processes("stepjax.checkpoint.set_aside")
    print_fn("resume: " + "; ".join(f"checkpoint {s} is damaged ({reason}), set aside as {s}{DAMAGED_SUFFIX}"
                                    for s, reason in damaged) + f"; resuming from checkpoint {step}")
  return state, int(step), dict(extra)
