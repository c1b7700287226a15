"""The tiny search_qa run of the host-mesh tests (tests/test_host_mesh.py), as a config file so that
experiments/train.py can load it in subprocesses: `--config=tests/host_mesh_config.py:QUESTIONS` (the question file
tests/test_experiments_host.py writes); the mesh comes from --config.mesh.* flags (default: one device).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: test_experiments_host's `tiny`

from experiments.configs import grpo  # noqa: E402
from test_experiments_host import tiny  # noqa: E402


def get_config(data: str, mesh=None, **train):
  """tests/test_experiments_host.py's tiny search_qa run with every batch divisible by data x fsdp = 4 (4 episodes in
  one minibatch, 4 held-out), 2 kv heads (tensor = 2 splits them), no SFT and no KL term (the suite's time: they
  cost 10 s and 5 s of compilation here; the SFT start on the mesh is run by the two-process drill, and a reference
  policy in the state was measured to agree with one device to the same tolerances)."""
  config = tiny(grpo.get_config(), data, **train)
  config.model.num_kv_heads = 2
  config.algo.update(minibatches=1, kl_coef=0.0)
  config.sft.steps = 0
  config.log.update(progress=False, tensorboard=False)
  if mesh:
    config.mesh.update(**mesh)
  return config
