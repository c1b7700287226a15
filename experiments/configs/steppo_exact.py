"""StepPO with the exact step ratio: the product of the step's token ratios (log-ratios summed), clipped per step."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "steppo_exact"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "step_gae", "step_ratio", "separate", "step"
  return c
