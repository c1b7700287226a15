"""REINFORCE++: token-level discounted returns, whitened over the batch by the estimator itself; no critic."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "reinforce_pp"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "reinforce_pp", "ppo", "none", "none"  # it whitens itself
  return c
