"""Token-level PPO at (gamma, lambda) = (1, 0.95), the common RLHF setting: lambda decays per token, so across a long
step the advantage of an early token leans on the critic much more than at lambda = 1."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.name = "token_ppo_lam95"
  c.algo.estimator, c.algo.loss, c.algo.critic, c.algo.whiten = "token_gae", "ppo", "separate", "token"
  c.algo.gamma, c.algo.lam = 1.0, 0.95
  return c
