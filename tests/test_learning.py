"""RL learns in the runner's setting: StepPO from an SFT start raises success on a fixed pool of training tasks. Its
own file (the suite's slowest test) so that `--dist loadfile` runs it beside test_experiments.py."""

import jax
import numpy as np

from experiments import runner
from experiments.configs import steppo
from stepjax import train
from test_experiments import one_hop


def test_short_run_raises_success_over_the_sft_start():
  """StepPO on the default environment, fixed seeds, small settings (100 SFT steps, 20 RL iterations on a pool of 4
  training tasks): success on those tasks climbs well above where the SFT start had it. About 80 s on 2 cores."""
  config = one_hop(steppo.get_config())
  config.sft.steps = 100
  config.optim.update(actor_lr=1e-3, critic_lr=1e-3, schedule="constant", warmup_steps=0)
  config.algo.critic = "head"
  config.train.update(seeds=1, task_pool=4)
  config.log.progress = False
  setup = runner.build(config)
  start = runner.warm_start(setup, progress=False)
  pool = train.task_pool_keys(config.train.task_pool_seed, 4)
  run = jax.jit(train.make_train(setup.model_config, setup.env, setup.rollout_config, setup.update_config,
                                 setup.optim_config, 20, pool))
  evaluate = jax.jit(train.make_evaluate(setup.model_config, setup.env, setup.rollout_config, 4))
  before = evaluate(start, setup.env_params, jax.random.key(1), pool)
  state, metrics = run(jax.random.key(3), setup.env_params, start)
  after = evaluate(state.params["policy"], setup.env_params, jax.random.key(1), pool)
  success = np.asarray(metrics["success_rate"])  # sampled, 32 episodes per iteration
  assert success[:3].mean() < 0.1  # the SFT start rarely solves these four tasks
  assert success[-5:].mean() > success[:3].mean() + 0.2, success
  assert float(after["success"]) > float(before["success"]), (before, after)  # greedy, on the pool
  assert int(np.asarray(metrics["skipped"]).sum()) == 0
