"""experiments.runner on a device mesh (config.mesh): the same run as on one device, a sharded checkpoint resumed, one
line for a mesh that cannot work, and (drill) two processes of 4 devices each as one run of 8.

The in-process tests use the 8 fake CPU devices of tests/conftest.py; the drill starts experiments/train.py in
subprocesses joined by jax.distributed over gloo on 127.0.0.1, as tests/test_multihost.py does.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runner_mesh_config  # tests/ is on the path (rootdir-relative imports, like tests/helpers.py)
from experiments import runner
from experiments.configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
CONFIG = os.path.join(ROOT, "tests", "runner_mesh_config.py")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
# Sharded reductions (gradients over data x fsdp, tensor-parallel matmuls) add in another order than one device, so
# float metrics agree to float32 rounding; the same tokens are sampled (env_steps, an int, is compared exactly). The
# largest differences measured: 6e-6 (one device vs the mesh), 3.5e-6 (2 processes x 4 devices vs 1 x 8).
RTOL, ATOL = 1e-4, 1e-5

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py


def tiny(mesh=None, **train):
  """tests/runner_mesh_config.py (steppo, 2 seeds, batches of 8) with a value head and a KL term, so the state holds
  a critic and a reference policy, and no SFT (the drill warm-starts on the mesh)."""
  config = runner_mesh_config.get_config("steppo")
  config.algo.update(critic="head", kl_coef=0.05)
  config.sft.steps = 0
  config.train.update(**train)
  if mesh:
    config.mesh.update(**mesh)
  return config


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def assert_same_logs(a_dir, b_dir, names=("metrics.jsonl", "eval.jsonl"), by_seed=False):
  """The logs of two runs agree line by line: the same keys, integers and flags equal, floats to RTOL / ATOL; the
  machine-dependent timings (runner.TIMING_KEYS) are left out. by_seed: compare the lines in (seed, iteration)
  order (a host run resumed in the middle writes its seeds' lines in another order than a run straight through)."""
  order = lambda line: (line.get("seed", 0), line.get("iteration", 0), line.get("step", 0))  # noqa: E731
  for name in names:
    a, b = _lines(os.path.join(a_dir, name)), _lines(os.path.join(b_dir, name))
    if by_seed:
      a, b = sorted(a, key=order), sorted(b, key=order)
    assert len(a) == len(b) and a, (name, len(a), len(b))
    for x, y in zip(a, b):
      x = {k: v for k, v in x.items() if k not in runner.TIMING_KEYS}
      y = {k: v for k, v in y.items() if k not in runner.TIMING_KEYS}
      assert x.keys() == y.keys(), name
      for key in x:
        if isinstance(x[key], float):
          np.testing.assert_allclose(y[key], x[key], rtol=RTOL, atol=ATOL, err_msg=f"{name} {key} {x}")
        else:
          assert x[key] == y[key], (name, key, x, y)


@needs_8
def test_mesh_run_matches_one_device_and_resumes(tmp_path):
  """2 iterations on one device == 1 iteration on a (2, 2, 2) mesh, then --resume to 2 (the sharded checkpoint
  restored into its shardings): the same metrics and evaluations, and a state laid out as the rules say."""
  one = runner.run(tiny(iterations=2), str(tmp_path / "one"), print_fn=lambda _: None)
  assert runner.build(tiny()).mesh is None  # the default config runs today's unsharded programs
  runner.run(tiny(MESH, iterations=1), str(tmp_path / "mesh"), print_fn=lambda _: None)
  printed = []
  mesh = runner.run(tiny(MESH, iterations=2), str(tmp_path / "mesh"), resume=True, print_fn=printed.append)
  assert_same_logs(tmp_path / "one", tmp_path / "mesh")
  assert sorted(d for d in os.listdir(tmp_path / "mesh" / "checkpoints") if d.isdigit()) == ["1", "2"]
  assert len(printed) == 1 and printed[0].startswith("held-out evaluation")  # the summary; the logs matched

  state = mesh["state"]
  q = state.params["policy"]["layers_0"]["attn"]["q_proj"]["kernel"]  # [seeds, embed, heads, head_dim]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 16, 1, 16)
  assert state.ref_params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert state.params["policy"]["value_head"]["kernel"].sharding.spec == P(None, "fsdp")
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q.shape]  # Adam's mu and nu of q, k and v
  assert len(moments) == 6 and all(x.sharding.spec == P(None, "fsdp", "tensor", None) for x in moments)
  for a, b in zip(jax.tree.leaves(one["state"]), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"mesh.data": 3}, r"^mesh\.data: data=3 x fsdp=1 x tensor=1 multiply to 3, but there are 8 devices "
                       r"\(jax\.device_count\(\)\)"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"^mesh\.fsdp: at most one axis may be -1 \(the rest of the devices\); "
                                         r"mesh\.data is -1 too"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, r"^mesh\.data: -1 takes the rest of the 8 devices, but the other axes .* "
                                        r"multiply to 3, which does not divide 8"),
    ({"mesh.tensor": 0}, r"^mesh\.tensor: must be an int >= 1, or -1 for the rest of the devices, got 0"),
    ({"mesh.rules": "zero3"}, r"^mesh\.rules: unknown 'zero3'; allowed: dp, fsdp, tp, fsdp_tp"),
    ({"mesh.data": 8, "rollout.num_tasks": 3, "rollout.episodes_per_task": 2},
     r"^rollout\.num_tasks: the episode batch rollout\.num_tasks x rollout\.episodes_per_task = 3 x 2 = 6 is not "
     r"divisible by the mesh's data x fsdp = 8 \(mesh\.data=8, mesh\.fsdp=1\)"),
    ({"mesh.data": 4, "mesh.fsdp": 2, "algo.minibatches": 8},
     r"^algo\.minibatches: the minibatch of 32 / 8 = 4 episodes is not divisible by the mesh's data x fsdp = 8"),
    ({"mesh.data": 4, "mesh.tensor": 2, "train.eval_episodes": 6},
     r"^train\.eval_episodes: 6 is not divisible by the mesh's data x fsdp = 4"),
    ({"mesh.data": 8, "sft.num_tasks": 12}, r"^sft\.num_tasks: the SFT batch of 12 expert episodes is not divisible"),
    ({"mesh.data": 2, "mesh.tensor": 4}, r"^model\.num_kv_heads: 2 is not divisible by 4, the mesh's tensor size "
                                         r"that mesh\.rules='fsdp_tp' splits 'kv_heads' over"),
    # a host environment's batches are checked too, before its data loads (no env.data is given here)
    ({"mesh.data": -1, "env.name": "search_qa", "rollout.num_tasks": 3},
     r"^rollout\.num_tasks: the episode batch rollout\.num_tasks x rollout\.episodes_per_task = 3 x 4 = 12 is not "
     r"divisible by the mesh's data x fsdp = 8"),
])
@needs_8
def test_bad_mesh_is_one_line_naming_the_field(fields, message):
  config = base.get_config()
  for field, value in fields.items():
    section, leaf = field.split(".")
    config[section][leaf] = value
  with pytest.raises(ValueError, match=message) as error:
    runner.build(config)
  assert "\n" not in str(error.value)


def test_model_fields_reach_the_model_config():
  config = base.get_config()
  config.model.update(param_dtype="bfloat16", remat="dots_saveable", scan_layers=True)
  model = runner.build(config).model_config
  assert (model.param_dtype, model.remat, model.scan_layers) == ("bfloat16", "dots_saveable", True)
  config.model.remat = "keep_everything"
  with pytest.raises(ValueError, match=r"^model\.remat: must be a bool or one of nothing_saveable"):
    runner.build(config)


# ------------------------------------------------------------------------------------------------------
# Drill: several processes (experiments/train.py --coordinator_address ...).
# ------------------------------------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir, devices: int, processes: int, *flags, config: str = CONFIG, timeout: int = 900):
  """experiments/train.py on `config` (default tests/runner_mesh_config.py, steppo: SFT warm start, a separate critic)
  over a (2, 2, 2) mesh of `processes` x `devices` fake CPU devices; every process gets the same command but its
  --process_id."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # tests/conftest.py's cheapest code generation, with this process's device count.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  command = [sys.executable, TRAIN, f"--config={config}", f"--workdir={workdir}",
             *[f"--config.mesh.{axis}={size}" for axis, size in MESH.items()], *flags]
  if processes > 1:
    command.append(f"--coordinator_address=127.0.0.1:{_free_port()}")
    command.append(f"--num_processes={processes}")
  procs = [subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-3000:]
      outs.append(out)
  finally:
    for p in procs:
      p.kill()
  return outs


@pytest.mark.drill
def test_two_processes_match_one_and_resume(tmp_path):
  """2 processes x 4 devices == 1 process x 8 devices (the same (2, 2, 2) mesh), for the SFT start, the metrics and
  the evaluations; the 2-process run stops after its first chunk and resumes across the restart. Only process 0
  writes logs and prints; both write their shards of every checkpoint."""
  _train(tmp_path / "one", 8, 1)
  outs = _train(tmp_path / "two", 4, 2, "--config.train.iterations=1")
  assert "held-out evaluation of 'steppo' after 1 iterations" in outs[0] and "held-out" not in outs[1]
  outs = _train(tmp_path / "two", 4, 2, "--resume")
  assert "held-out evaluation of 'steppo' after 2 iterations" in outs[0] and "held-out" not in outs[1]
  assert_same_logs(tmp_path / "one", tmp_path / "two", names=("sft.jsonl", "metrics.jsonl", "eval.jsonl"))
  assert sorted(d for d in os.listdir(tmp_path / "two" / "checkpoints") if d.isdigit()) == ["1", "2"]
