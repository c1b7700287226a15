"""GiGPO: episode-level group advantage plus step-level advantages of steps that share an anchor state; no critic."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "gigpo"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "gigpo", "ppo", "none", "none"
  return c
