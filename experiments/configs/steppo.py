"""StepPO: step-level GAE over step boundaries, GSPO-style step-aligned ratio, critic read once per step."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "steppo"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "step_gae", "gspo", "separate", "step"
  return c
