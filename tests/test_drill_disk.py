"""Full and read-only disks: a checkpoint or log line that cannot be written is one line naming the directory (or
file), and the previous checkpoint stays intact and restorable.

Where the test may mount a small tmpfs (root, `mount -t tmpfs` allowed: this machine) the disk really fills up and
really turns read-only; elsewhere the failure is injected (orbax's save or the log's write raising the OSError a full
or read-only disk would) and chmod 0o555 is used for read-only when not root."""

import errno
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from drills import disk as disk_drill
from drills import kill
from experiments import runner
from stepjax import train
from stepjax.train import checkpoint as checkpoint_lib

# Subprocess runs of train.py: too slow for the suite's 10 minutes, run by `make drills` (CI's drills step).
pytestmark = pytest.mark.drill

NO_SPACE = os.strerror(errno.ENOSPC)


def _mount(path: str, size_kib: int) -> bool:
  """Mounts a tmpfs of size_kib at path when allowed; whether it did."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path], capture_output=True)
  return done.returncode == 0


@pytest.fixture
def disk(tmp_path):
  """(path, real): a 4 MiB tmpfs at path when it could be mounted (real=True), else a plain directory."""
  path = str(tmp_path / "disk")
  real = _mount(path, 4096)
  yield path, real
  if real:
    subprocess.run(["umount", "-l", path], check=False)


def _state(step: int) -> dict:
  w = jax.random.normal(jax.random.key(step), (64, 64), jnp.float32)  # incompressible: a data file of its own
  return {"w": w, "b": jnp.full((8,), step, jnp.int32)}


def _abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _inject(monkeypatch, code: int, from_step: int) -> None:
  """orbax's save fails from `from_step` on with the OSError a full or read-only disk raises."""
  save = ocp.CheckpointManager.save

  def failing(self, step, *args, **kwargs):
    if step >= from_step:
      raise OSError(code, os.strerror(code))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing)


def _save_and_finish(manager, step):
  train.save_checkpoint(manager, _state(step), step, {"iteration": step})
  checkpoint_lib.finish_saves(manager)


def test_full_disk_checkpoint_is_one_line_and_the_previous_one_is_intact(disk, monkeypatch):
  path, real = disk
  directory = os.path.join(path, "checkpoints")
  manager = train.make_checkpoint_manager(directory)  # asynchronous: the failure surfaces in the background
  train.save_checkpoint(manager, _state(1), 1, {"iteration": 1})
  manager.wait_until_finished()
  filler = disk_drill.fill(path) if real else _inject(monkeypatch, errno.ENOSPC, 2)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    _save_and_finish(manager, 2)
  assert str(error.value) == (f"checkpoint: cannot write to {directory}: {NO_SPACE}; the previous checkpoint "
                              "(step 1) is intact")
  if real:
    os.remove(filler)
  else:
    monkeypatch.undo()
  state, step = train.restore_checkpoint(directory, _abstract())
  assert step == 1 and train.checkpoint_metadata(directory) == {"iteration": 1}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With space again, a new writer clears the half-written step and saves it.
  _save_and_finish(train.make_checkpoint_manager(directory), 2)
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_read_only_checkpoint_directory_is_one_line(disk, monkeypatch):
  path, real = disk
  directory = os.path.join(path, "checkpoints")
  manager = train.make_checkpoint_manager(directory)
  _save_and_finish(manager, 1)
  manager = train.make_checkpoint_manager(directory)
  if real:
    subprocess.run(["mount", "-o", "remount,ro", path], check=True)
    reason = os.strerror(errno.EROFS)
  elif os.geteuid() != 0:
    os.chmod(directory, 0o555)
    reason = os.strerror(errno.EACCES)
  else:
    _inject(monkeypatch, errno.EROFS, 2)
    reason = os.strerror(errno.EROFS)
  try:
    with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
      _save_and_finish(manager, 2)
    assert str(error.value) == (f"checkpoint: cannot write to {directory}: {reason}; the previous checkpoint "
                                "(step 1) is intact")
    state, step, extra = checkpoint_lib.restore_usable_checkpoint(directory, _abstract(), print_fn=pytest.fail)
    assert (step, extra) == (1, {"iteration": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))
  finally:
    if real:
      subprocess.run(["mount", "-o", "remount,rw", path], check=True)
    elif os.geteuid() != 0:
      os.chmod(directory, 0o755)


def test_full_disk_log_line_is_one_line_and_its_torn_tail_is_dropped_on_resume(disk, monkeypatch):
  path, real = disk
  log = os.path.join(path, "metrics.jsonl")
  first = {"iteration": 1, "seed": 0, "loss": 0.5}
  runner._append_jsonl(log, first)
  long_line = {"iteration": 2, "seed": 0, "note": "x" * 8000}  # longer than the rest of the file's page
  if real:
    filler = disk_drill.fill(path)
  else:
    real_open = open

    class Full:
      """A file that takes 100 bytes and then runs out of space, like a write on a full disk."""

      def __init__(self, *args):
        self.f = real_open(*args)

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        self.f.close()

      def writelines(self, lines):
        self.f.write("".join(lines)[:100])
        self.f.flush()
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(runner, "open", Full, raising=False)
  with pytest.raises(runner.LogWriteError) as error:
    runner._append_jsonl(log, long_line)
  assert str(error.value) == f"log: cannot write to {log}: {NO_SPACE}"
  if real:
    os.remove(filler)
  else:
    monkeypatch.undo()
  with open(log) as f:
    text = f.read()
  assert text.startswith(json.dumps(first) + "\n") and not text.endswith("\n")  # a torn second line
  with pytest.raises(ValueError, match=rf"^log: {log} line 2 is not JSON"):
    runner._read_jsonl(log)
  assert runner._read_jsonl(log, torn_tail=True) == [first]
  assert runner._cut_jsonl(log, lambda line: True) == [first]
  with open(log) as f:
    assert f.read() == json.dumps(first) + "\n"


def test_run_halts_with_one_line_on_a_full_checkpoint_disk_and_resumes_after(tmp_path, monkeypatch):
  """A run whose checkpoint directory fills up stops with one line naming the intact checkpoint; with space again
  --resume continues from it and ends like an uninterrupted run."""
  quiet = lambda _: None  # noqa: E731
  straight = runner.run(kill.make_config(iterations=4), str(tmp_path / "straight"), print_fn=quiet)
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")
  real = _mount(checkpoints, 8192)
  try:
    runner.run(kill.make_config(iterations=2), workdir, print_fn=quiet)
    filler = disk_drill.fill(checkpoints) if real else _inject(monkeypatch, errno.ENOSPC, 3)
    with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
      runner.run(kill.make_config(iterations=4), workdir, resume=True, print_fn=quiet)
    assert str(error.value) == (f"checkpoint: cannot write to {os.path.abspath(checkpoints)}: {NO_SPACE}; the "
                                "previous checkpoint (step 2) is intact")
    if real:
      os.remove(filler)
    else:
      monkeypatch.undo()
    printed = []
    resumed = runner.run(kill.make_config(iterations=4), workdir, resume=True, print_fn=printed.append)
    assert not any(line.startswith("resume:") for line in printed)  # checkpoint 2 was whole, the logs cut to it
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("metrics.jsonl", "eval.jsonl"):
      a, b = (runner._read_jsonl(os.path.join(d, name)) for d in (str(tmp_path / "straight"), workdir))
      assert [{k: v for k, v in x.items() if k not in runner.TIMING_KEYS} for x in a] == \
          [{k: v for k, v in x.items() if k not in runner.TIMING_KEYS} for x in b]
  finally:
    if real:
      subprocess.run(["umount", "-l", checkpoints], check=False)
