"""Damaged checkpoints: a resume takes the newest checkpoint that reads back whole, names the damaged newer ones and
sets them aside; with none usable it is one line naming the directory."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import train
from stepjax.train import checkpoint as checkpoint_lib


def _state(step: int) -> dict:
  """A pytree with an array big enough (16 KiB, random: zstd cannot shrink it) to be stored in a data file of its
  own, not inlined into orbax's metadata: the largest file of the step is then the one that holds it."""
  w = jax.random.normal(jax.random.key(step), (64, 64), jnp.float32)  # incompressible: a data file of its own
  return {"w": w, "b": jnp.full((8,), step, jnp.int32)}


def _abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _save_steps(directory, steps):
  manager = train.make_checkpoint_manager(directory, max_to_keep=None, async_save=False)
  for step in steps:
    assert train.save_checkpoint(manager, _state(step), step, {"iteration": step})
  checkpoint_lib.finish_saves(manager)


def _largest_file(step_dir) -> str:
  files = [os.path.join(d, name) for d, _, names in os.walk(os.path.join(step_dir, "state")) for name in names]
  return max(files, key=os.path.getsize)


def _delete(path):
  os.remove(path)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _raw(x):
  return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_raw(x), _raw(y))


@pytest.mark.parametrize("damage", [_delete, _truncate], ids=["deleted", "truncated"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, damage):
  _save_steps(tmp_path, (2, 4, 6))
  damage(_largest_file(tmp_path / "6"))
  lines = []
  state, step, extra = checkpoint_lib.restore_usable_checkpoint(tmp_path, _abstract(), print_fn=lines.append)
  assert (step, extra) == (4, {"iteration": 4})
  _assert_equal(state, _state(4))
  assert len(lines) == 1 and lines[0].startswith("resume: checkpoint 6 is damaged (")
  assert lines[0].endswith("), set aside as 6.damaged; resuming from checkpoint 4")
  # Set aside, so the resumed run can save step 6 again (orbax skips a step at or below the newest one).
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "6.damaged"]
  _save_steps(tmp_path, (6,))
  state, step, _ = checkpoint_lib.restore_usable_checkpoint(tmp_path, _abstract(), print_fn=lines.append)
  assert step == 6 and len(lines) == 1
  _assert_equal(state, _state(6))


def test_damaged_metadata_and_two_damaged_steps(tmp_path):
  _save_steps(tmp_path, (1, 2, 3))
  with open(tmp_path / "3" / "extra" / "metadata", "w") as f:
    f.write('{"iteration": 3')  # cut short
  os.remove(tmp_path / "2" / "state" / "manifest.ocdbt")
  lines = []
  state, step, extra = checkpoint_lib.restore_usable_checkpoint(tmp_path, _abstract(), print_fn=lines.append)
  assert (step, extra["iteration"]) == (1, 1)
  _assert_equal(state, _state(1))
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith("resume: checkpoint 3 is damaged (") and "; checkpoint 2 is damaged (" in lines[0]
  assert lines[0].endswith("; resuming from checkpoint 1")


def test_no_usable_checkpoint_is_one_line_naming_the_directory(tmp_path):
  _save_steps(tmp_path, (1, 2))
  for step in (1, 2):
    _delete(_largest_file(tmp_path / str(step)))
  with pytest.raises(FileNotFoundError) as error:
    checkpoint_lib.restore_usable_checkpoint(tmp_path, _abstract(), print_fn=pytest.fail)
  message = str(error.value)
  assert message.startswith(f"checkpoint.directory: {tmp_path} holds no usable checkpoint (checkpoint 2: ")
  assert "; checkpoint 1: " in message and "\n" not in message and len(message) < 800
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing set aside when nothing is usable
