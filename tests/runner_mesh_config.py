"""A few-second experiment config for the mesh tests (tests/test_runner_mesh.py), as a config file so that
experiments/train.py can load it in subprocesses: one-hop lookup_qa, a 1-layer 32-wide model whose every split
dimension divides a (2, 2, 2) mesh, batches of 8 episodes (minibatches of 4), 2 seeds.

`--config=tests/runner_mesh_config.py:ALGO` picks the method's config file (steppo: a separate critic) and the mesh
comes from --config.mesh.* flags (default: one device).
"""

import importlib


def get_config(algo: str = "steppo"):
  config = importlib.import_module(f"experiments.configs.{algo or 'steppo'}").get_config()
  config.env.update(step_format="plain", hops=1, max_hops=1, num_entities=16)
  config.rollout.update(max_steps=4, max_len=128, max_action_len=6, num_tasks=2, episodes_per_task=4)
  config.model.update(max_position_embeddings=512, attention_block=0, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16)
  config.algo.minibatches = 2
  config.sft.update(steps=2, num_tasks=4)
  config.train.update(iterations=2, eval_every=1, eval_episodes=4, seeds=2)
  config.log.update(progress=False, tensorboard=False)
  return config
