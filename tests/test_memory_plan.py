"""benchmarks/memory.py on the tiny config and 8 fake devices: per-device state bytes equal the hand-summed shard sizes,
and the analytic estimate of parameter and optimizer bytes is exact."""

import math

import jax
import numpy as np
import pytest

from benchmarks import memory
from stepjax import sharding
from stepjax.train.optim import CRITIC
from stepjax.train.state import StateSpec, abstract_state, state_shardings

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py


def _spec(rule: str):
  config = memory.model_config("tiny", remat=False, scan=False, param_dtype="float32")
  mesh_shape = memory.mesh_axes(config, rule, 8)
  mesh = sharding.make_mesh(mesh_shape)
  update_config, optim_config = memory.update_configs()
  return StateSpec.for_update(config, update_config, optim_config, mesh=mesh, rules=sharding.get_rules(rule)), mesh


@needs_8
@pytest.mark.parametrize("rule", ["dp", "fsdp", "tp", "fsdp_tp"])
def test_state_bytes_match_shards_and_analytic(rule):
  spec, mesh = _spec(rule)
  reported = memory.state_bytes(spec)
  state, shardings = abstract_state(spec), state_shardings(spec)

  def by_hand(tree, shard_tree):  # the bytes device 0 holds: the slice its index map gives it, leaf by leaf
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shard_tree)):
      index = s.devices_indices_map(x.shape)[mesh.devices.flat[0]]
      size = math.prod(len(range(*sl.indices(n))) for sl, n in zip(index, x.shape))
      total += size * np.dtype(x.dtype).itemsize
    return total

  assert reported["policy"] == by_hand(state.params["policy"], shardings.params["policy"])
  assert reported["critic"] == by_hand(state.params[CRITIC], shardings.params[CRITIC])
  assert reported["reference"] == by_hand(state.ref_params, shardings.ref_params)
  assert reported["optimizer"] == by_hand(state.opt_state, shardings.opt_state)
  full = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params["policy"]))
  if rule == "dp":
    assert reported["policy"] == full
  else:
    assert reported["policy"] < full

  analytic = memory.analytic_state(spec.model, spec.rules, dict(mesh.shape))
  for part in ("policy", "critic", "reference", "optimizer", "total"):
    assert analytic[part] == reported[part], part
