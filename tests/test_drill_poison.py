"""Poison: NaN / Inf in a reward, a logit and a gradient. Each poisoned RL or SFT update is skipped and counted,
params and the whole optimizer state stay bit-identical, the next good batch trains, halt_on_nonfinite halts with
one line, and the skip counters reach metrics.jsonl and the TensorBoard event files.

The model, batches, poisons and the checks of one case are the poison drill's (`drills/poison.py`, which explains
each poison); the values are asserted here.
"""

import dataclasses
import glob
import json
import os
import struct

import jax
import numpy as np
import pytest

from drills import poison
from experiments import runner
from stepjax import train

HALT = ("update: {n} minibatch update(s) had a non-finite loss or gradient and were skipped "
        "(update.halt_on_nonfinite=True)")


@pytest.mark.parametrize("name", list(poison.CASES))
def test_poisoned_update_is_skipped_and_the_next_one_applies(name):
  config, poison_fn = poison.CASES[name]
  outcome, metrics = poison.run_case(name, config, poison_fn)
  steps = 1 if config is None else config.epochs * config.minibatches
  assert (outcome.skipped, outcome.skipped_updates, outcome.expected_skips) == (steps, steps, steps)
  assert outcome.params_identical and outcome.opt_state_identical
  halt = HALT if config is not None else HALT.replace("update", "sft", 1).replace("update.", "train.")
  assert outcome.halted == halt.format(n=steps)
  assert (outcome.next_skipped, outcome.next_moved, outcome.next_finite) == (0, True, True)
  assert outcome.ok
  if "overflow" in name:  # the loss is finite: only the gradient check catches it
    assert np.isfinite(metrics["loss"]) and abs(metrics["loss"]) > 1e20 and metrics["grad_norm"] == np.inf
  else:
    assert np.isnan(metrics["loss"]) and np.isnan(metrics["grad_norm"])
  if "reward N" in name or "reward +" in name:  # the NaN reached every advantage (whitening is batch-wide)
    assert np.isnan(metrics["advantage_mean"]) and np.isnan(metrics["step_advantage_std"])


def _adam_leaves(opt_state) -> dict:
  """'mu' / 'nu' / 'count' -> the Adam leaves of the optimizer state."""
  out = {"mu": [], "nu": [], "count": []}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [key.name for key in path if isinstance(key, jax.tree_util.GetAttrKey)]
    for key in out:
      if key in names:
        out[key].append(np.asarray(leaf))
  return out


def test_skipped_steps_leave_adam_moments_and_counts_alone():
  """The bit-identity covers Adam's mu, nu and step counts; only the applied update advances the counts."""
  update = poison.update_fn(poison.RL)
  before, batch = poison.nan_reward(poison.initial_state(poison.RL), poison.good_batch(0))
  state, _ = update(poison._fresh(before), batch)
  after = jax.device_get(state)
  adam_before, adam_after = _adam_leaves(before.opt_state), _adam_leaves(after.opt_state)
  assert all(adam_before[key] for key in adam_before)  # the optimizer state has them (actor and critic)
  for key in adam_before:
    for x, y in zip(adam_before[key], adam_after[key]):
      assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
  assert int(after.step) == int(before.step) + 1 and int(after.skipped_updates) == 4
  state, _ = update(state, poison.good_batch(1))
  adam_next = _adam_leaves(jax.device_get(state).opt_state)
  steps = poison.RL.epochs * poison.RL.minibatches
  assert [int(c) for c in adam_next["count"]] == [int(c) + steps for c in adam_before["count"]]
  assert any(np.abs(m).max() > 0 for m in adam_next["mu"]) and not any(np.abs(m).max() > 0 for m in adam_before["mu"])
  assert int(state.skipped_updates) == 4  # the counter is cumulative


def test_sft_reads_no_rewards_and_halts_with_one_line():
  update = poison.update_fn(poison.SFT)
  state, batch = poison.nan_reward(poison.initial_state(poison.SFT), poison.good_batch(0))
  state, metrics = update(poison._fresh(state), batch)
  assert float(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
  assert poison.finite_except_poison(jax.device_get(state.params))
  halt = {"skipped": np.array([[0.0, 1.0, 1.0]])}  # make_sft_run's [warm starts, steps] metrics
  train.check_halt(halt, False, field="sft")
  with pytest.raises(FloatingPointError, match=r"^sft: 2 minibatch update\(s\) had a non-finite loss or gradient and "
                                               r"were skipped \(train\.halt_on_nonfinite=True\)$"):
    train.check_halt(halt, True, field="sft", flag="train.halt_on_nonfinite")
  train.check_halt({"skipped": np.zeros((1, 3))}, True, field="sft")


def _tensorboard_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from the TFRecord event files in `directory` (read with tensorboardX's protos)."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents*"))):
    with open(path, "rb") as f:
      data, offset = f.read(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_skips_reach_metrics_jsonl_and_tensorboard(tmp_path):
  """What the runner's loop does with every update metric (`runner.Logger`): a poisoned then a good update."""
  update = poison.update_fn(poison.RL)
  before, batch = poison.nan_reward(poison.initial_state(poison.RL), poison.good_batch(0))
  state, first = update(poison._fresh(before), batch)
  state, second = update(state, poison.good_batch(1))
  logger = runner.Logger(str(tmp_path), (0,), 2, 0, tensorboard=True, progress=False, description="poison")
  for iteration, metrics in ((1, first), (2, second)):
    values = {key: float(value) for key, value in jax.device_get(metrics).items()}
    logger.jsonl("metrics.jsonl", [{"iteration": iteration, "seed": 0, **values}])
    logger.scalars("train", 0, iteration, values)
  logger.close()
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [(line["skipped"], line["skipped_updates"]) for line in lines] == [(4.0, 4.0), (0.0, 4.0)]
  assert np.isnan(lines[0]["loss"]) and np.isfinite(lines[1]["loss"])  # NaN is logged as it is (JSON's NaN)
  scalars = _tensorboard_scalars(str(tmp_path / "tb" / "seed0"))
  assert scalars["train/skipped"] == [(1, 4.0), (2, 0.0)]
  assert scalars["train/skipped_updates"] == [(1, 4.0), (2, 4.0)]
  assert [step for step, _ in scalars["train/loss"]] == [2]  # TensorBoard gets only finite values


def test_halt_config_is_opt_in():
  outcome, metrics = poison.run_case("rl reward NaN", poison.RL, poison.nan_reward)
  train.check_halt(metrics, poison.RL)  # halting is opt-in
  with pytest.raises(FloatingPointError, match="^" + HALT.format(n=4).replace("(", r"\(").replace(")", r"\)") + "$"):
    train.check_halt(metrics, dataclasses.replace(poison.RL, halt_on_nonfinite=True))
  assert outcome.skipped == 4
