"""Token-level PPO: every token is an action, GAE over action tokens (gamma per token), critic at every token."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "token_ppo"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "token_gae", "ppo", "separate", "token"
  return c
