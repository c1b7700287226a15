"""experiments.host_runner on a device mesh (config.mesh, one process): a search_qa run on a (2, 2, 2) mesh of the 8
fake CPU devices (tests/conftest.py) gives the logs of the same run on one device, lays its state out as the rules
say, and resumes from its sharded checkpoint; several processes are refused in one line naming the mesh field.

The tiny search_qa data and config are tests/test_experiments_host.py's; the log comparison is
tests/test_runner_mesh.py's (floats to float32 rounding, everything else equal, the timings left out)."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import runner
from experiments.configs import grpo
from test_experiments_host import data, tiny  # noqa: F401  (tests/ is on the path; `data` is a pytest fixture)
from test_runner_mesh import MESH, assert_same_logs

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py


def tiny_mesh(data_path, mesh=None, **train):
  """tests/test_experiments_host.py's tiny search_qa run with every batch divisible by data x fsdp = 4 (4 episodes in
  one minibatch, 4 held-out), 2 kv heads (tensor = 2 splits them), no SFT and no KL term (the suite's time: they
  cost 10 s and 5 s of compilation here; the SFT start on the mesh and a reference policy in the state were measured
  to agree with one device to the same tolerances)."""
  config = tiny(grpo.get_config(), data_path, **train)
  config.model.num_kv_heads = 2
  config.algo.update(minibatches=1, kl_coef=0.0)
  config.sft.steps = 0
  config.log.tensorboard = False
  if mesh:
    config.mesh.update(**mesh)
  return config


@needs_8
def test_host_mesh_run_matches_one_device_and_resumes(tmp_path, data):  # noqa: F811
  """2 iterations on one device == 1 iteration on a (2, 2, 2) mesh, then a resume to 2 (each seed's sharded checkpoint
  restored into its shardings): the same metrics and evaluations; the state is laid out as the rules say."""
  quiet = lambda _: None  # noqa: E731
  one = runner.run(tiny_mesh(data, iterations=2), str(tmp_path / "one"), print_fn=quiet)
  assert runner.build(tiny_mesh(data, MESH)).mesh.shape == MESH
  runner.run(tiny_mesh(data, MESH, iterations=1), str(tmp_path / "mesh"), print_fn=quiet)
  mesh = runner.run(tiny_mesh(data, MESH, iterations=2), str(tmp_path / "mesh"), resume=True, print_fn=quiet)
  assert_same_logs(tmp_path / "one", tmp_path / "mesh")
  assert sorted(d for d in os.listdir(tmp_path / "mesh" / "checkpoints" / "seed0") if d.isdigit()) == ["0", "1", "2"]

  (state,) = mesh["state"]
  q = state.params["policy"]["layers_0"]["attn"]["q_proj"]["kernel"]  # [embed, heads, head_dim]
  assert q.sharding.spec == P("fsdp", "tensor", None) and q.sharding.mesh.shape == MESH
  assert q.addressable_shards[0].data.shape == (16, 1, 16)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q.shape]  # Adam's mu and nu of q, k and v
  assert len(moments) == 6 and all(x.sharding.spec == P("fsdp", "tensor", None) for x in moments)
  for a, b in zip(jax.tree.leaves(one["state"]), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)


@needs_8
def test_host_mesh_batches_must_split(data):  # noqa: F811
  config = tiny_mesh(data, MESH)
  config.algo.minibatches = 2
  with pytest.raises(ValueError, match=r"^algo\.minibatches: the minibatch of 4 / 2 = 2 episodes is not divisible by "
                                       r"the mesh's data x fsdp = 4") as error:
    runner.build(config)
  assert "\n" not in str(error.value)


@needs_8
def test_host_env_in_several_processes_is_one_line(data, monkeypatch):  # noqa: F811
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"^mesh\.data: data=2 x fsdp=2 x tensor=2 over 8 devices in 2 processes: the "
                                       r"host environments \(search_qa, textworld\) are stepped by one process") as e:
    runner.build(tiny_mesh(data, MESH))
  assert "\n" not in str(e.value)
