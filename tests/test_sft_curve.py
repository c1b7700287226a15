"""experiments/sft_curve.py and the override parsing the scripts share (experiments.configs): the SFT curve's last row
is the runner's own warm start, scored by the same held-out evaluation. Its own file so that it runs beside
test_experiments.py under `--dist loadfile`."""

import jax
import numpy as np
import pytest

from experiments import configs, runner, sft_curve
from experiments.configs import steppo
from stepjax import train
from test_experiments import small


def test_study_overrides_regime_then_sets():
  overrides = configs.study_overrides("one_hop", ["rollout.max_len=96", "sft.per_seed=true", "algo.kl_kind=k1"])
  assert overrides["rollout.max_len"] == 96 and overrides["env.hops"] == 1
  assert overrides["sft.per_seed"] is True and overrides["algo.kl_kind"] == "k1"
  with pytest.raises(ValueError, match=r"^regime: unknown 'two_hop'; allowed: two_hop_skip, one_hop"):
    configs.study_overrides("two_hop", [])
  with pytest.raises(ValueError, match=r"^set: expected field=value, got 'sft.steps'"):
    configs.study_overrides(None, ["sft.steps"])


def test_sft_curve_scores_the_warm_start_at_each_length():
  with pytest.raises(ValueError, match=r"^steps: expected increasing positive integers, got \[4, 2\]"):
    sft_curve.parse_steps(["4", "2"])
  with pytest.raises(ValueError, match=r"^steps: expected comma-separated integers"):
    sft_curve.parse_steps(["4", "x"])
  config = small(steppo.get_config())
  config.sft.steps = 4
  config.train.eval_episodes = 4
  setup = runner.build(config)
  rows = sft_curve.sft_curve(setup, [2, 4], show=1)
  assert [row["steps"] for row in rows] == [2, 4]
  for episode in rows[-1]["episodes"]:  # the prompt (question) first, then actions between [[ ]]
    assert episode.index("Q: what is the") < episode.index("[[") < episode.index("]]")
    assert episode.count("[[") == episode.count("]]")
  # The last row is the held-out score of the warm start the runner makes with that many steps (one per seed).
  evaluate = jax.jit(jax.vmap(train.make_evaluate(setup.model_config, setup.env, setup.rollout_config, 4),
                              in_axes=(0, None, None)))
  config.sft.per_seed = True  # the runner's per-seed warm start of 4 steps (in one chunk, not two)
  params = runner.warm_start(runner.build(config), progress=False)
  expected = jax.device_get(evaluate(params, setup.env_params, jax.random.key(config.train.eval_seed)))
  for key in ("success", "success_sampled", "invalid_rate", "episode_steps"):
    np.testing.assert_allclose(rows[-1][key], expected[key], atol=1e-6, err_msg=key)
  assert rows[0]["nll"] > rows[1]["nll"]
  assert "| 4 |" in sft_curve.format_table(rows)


def test_plain_format_start_then_think_format_steps():
  """--plain_steps: each seed's plain-format start, then think-format SFT from it. make_sft_run with one start per
  key (stacked) gives each key the run that starts every key from that key's start (the shared-start path, checked
  above); all of it in the same compiled chunk program."""
  config = small(steppo.get_config())
  with pytest.raises(ValueError, match=r"^plain_steps: a plain-format start is for lookup_qa in the think format"):
    sft_curve.plain_start(runner.build(config), 2)
  config.env.step_format = "think"
  config.rollout.max_action_len = 24
  setup = runner.build(config)
  start, plain_metrics = sft_curve.plain_start(setup, 2)
  assert np.asarray(plain_metrics["nll"]).shape == (2, 2) and np.isfinite(plain_metrics["nll"]).all()
  run = train.make_sft_run(setup.model_config, setup.sft_optim_config, setup.env, setup.sft_rollout_config,
                           chunk_size=2)
  keys = runner.sft_keys(setup)
  params, metrics = run(keys, setup.env_params, 2, start, stacked=True)
  for i in range(2):
    shared_params, shared_metrics = run(keys, setup.env_params, 2, jax.tree.map(lambda x: x[i], start))
    for key in ("nll", "token_accuracy"):
      np.testing.assert_array_equal(metrics[key][i], shared_metrics[key][i], err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b[i]), params, shared_params)
  assert not np.array_equal(metrics["nll"], run(keys, setup.env_params, 2)[1]["nll"])  # not from scratch
