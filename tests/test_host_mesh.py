"""experiments.host_runner on a device mesh (config.mesh, one process): a search_qa run on a (2, 2, 2) mesh of the 8
fake CPU devices (tests/conftest.py) gives the logs of the same run on one device, lays its state out as the rules
say, and resumes from its sharded checkpoint; and (drill) two processes of 4 devices each, each stepping its share of
the envs, as one run of 8.

The tiny search_qa data and config are tests/test_experiments_host.py's; the log comparison is
tests/test_runner_mesh.py's (floats to float32 rounding, everything else equal, the timings left out)."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import runner
from host_mesh_config import get_config as tiny_mesh  # tests/ is on the path
from test_experiments_host import data  # noqa: F401  (a pytest fixture)
from test_runner_mesh import MESH, _train, assert_same_logs

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py


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


@pytest.mark.drill
def test_host_env_two_processes_match_one_and_resume(tmp_path, data):  # noqa: F811
  """search_qa on a (2, 2, 2) mesh: 2 processes x 4 devices, each stepping the envs of its half of every batch, ==
  1 process x 8 devices stepping all of them, for the SFT start (expert episodes), the metrics and the evaluations
  of 2 seeds; the 2-process run stops after its first iteration and resumes across the restart. Only process 0
  writes logs and prints."""
  config = f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'host_mesh_config.py')}:{data}"
  flags = ("--config.sft.steps=2", "--config.train.seeds=2")
  _train(tmp_path / "one", 8, 1, *flags, config=config)
  outs = _train(tmp_path / "two", 4, 2, *flags, "--config.train.iterations=1", config=config)
  assert "held-out evaluation of 'grpo' after 1 iterations" in outs[0] and "held-out" not in outs[1]
  outs = _train(tmp_path / "two", 4, 2, *flags, "--resume", config=config)
  assert "held-out evaluation of 'grpo' after 2 iterations" in outs[0] and "held-out" not in outs[1]
  assert_same_logs(tmp_path / "one", tmp_path / "two", names=("sft.jsonl", "metrics.jsonl", "eval.jsonl"),
                   by_seed=True)
  for seed in ("seed0", "seed1"):
    assert sorted(d for d in os.listdir(tmp_path / "two" / "checkpoints" / seed) if d.isdigit()) == ["0", "1", "2"]
