"""RLOO: the episode return minus the mean of the other episodes of its group; no critic."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "rloo"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "rloo", "ppo", "none", "none"
  return c
