"""GRPO: the group-normalised episode return broadcast to every token; no critic."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "grpo"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "grpo", "ppo", "none", "none"
  return c
