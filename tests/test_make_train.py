"""make_train / make_sft_run / make_evaluate: the PureJaxRL-style whole-run functions against the pieces they are
made of (rollout, then make_update), vmap over seeds, and a short run on the default environment that learns."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from stepjax import credit, losses, rollout, train
from stepjax.envs import lookup_qa
from stepjax.models import Transformer, ValueConfig, get_config
from stepjax.tokenizers import WordTokenizer

TOK = WordTokenizer(lookup_qa.vocabulary())
ENV = lookup_qa.LookupQA(TOK, num_entities=16, max_hops=1, max_action_len=6)
PARAMS = ENV.default_params().replace(hops=1, max_steps=4)
MODEL = get_config("tiny", vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16, max_position_embeddings=256)
ROLLOUT = rollout.RolloutConfig(num_tasks=2, episodes_per_task=2, max_steps=4, max_len=128, max_action_len=6,
                                stop_ids=(TOK.end_of_step_id, TOK.eos_id), pad_id=TOK.pad_id)
UPDATE = train.UpdateConfig(credit=credit.CreditConfig("step_gae", gamma=0.9, lam=0.8),
                            policy_loss=losses.PolicyLossConfig("ppo"), value=ValueConfig(kind="head"), epochs=2,
                            minibatches=2, kl_coef=0.01)
OPTIM = train.OptimConfig(actor_lr=1e-3, critic_lr=1e-3)
FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time matters, code quality does not


def _jit(fn):
  return jax.jit(fn, compiler_options=FAST)


@functools.cache
def _train_program():
  """The one jitted 2-iteration `train` the tests share (compiled once per worker)."""
  return _jit(train.make_train(MODEL, ENV, ROLLOUT, UPDATE, OPTIM, 2))


@functools.cache
def _sample_program(config=ROLLOUT):
  return _jit(rollout.make_rollout(Transformer(MODEL), ENV, config))


def _close(a, b, atol=1e-4):
  """Adam steps ~ lr = 1e-3 whatever the gradient's size, so float32 reordering between a fused scan and separate
  programs shows up as up to ~1e-4 in elements with near-zero gradients; a wiring error moves whole tensors."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_make_train_is_rollout_then_update():
  """train(key) == init, then per iteration: split the state's key, roll out with it, make_update."""
  key = jax.random.key(3)
  state, metrics = _train_program()(key, PARAMS)

  manual = train.init_train_state(MODEL, UPDATE, OPTIM, key)
  sample = _sample_program()
  update = train.make_update(MODEL, UPDATE, OPTIM, compiler_options=FAST)
  for i in range(2):
    rng, rollout_key = jax.random.split(manual.key)
    trunk = {k: v for k, v in manual.params["policy"].items() if k != "value_head"}
    batch, info = sample(trunk, PARAMS, rollout_key)
    batch.validate()
    manual, step_metrics = update(manual.replace(rng=jax.random.key_data(rng)), batch)
    expected = train.rollout_metrics(batch, info)
    for name in ("success_rate", "agent_steps", "action_tokens", "return_mean"):
      assert float(metrics[name][i]) == pytest.approx(float(expected[name]), abs=1e-6), name
    per_step = np.asarray(batch.action_mask).sum() / np.asarray(batch.step_mask).sum()
    assert float(metrics["tokens_per_step"][i]) == pytest.approx(per_step, rel=1e-6)
    for name in ("loss", "policy_loss", "value_loss", "kl"):
      assert float(metrics[name][i]) == pytest.approx(float(step_metrics[name]), rel=1e-3, abs=1e-5), name
  assert int(state.step) == 2
  _close(state.params, manual.params)
  np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(manual.rng))


def test_make_train_vmaps_over_seeds():
  train_fn = train.make_train(MODEL, ENV, ROLLOUT, UPDATE, OPTIM, 2)
  keys = jax.random.split(jax.random.key(0), 2)
  both, metrics = _jit(jax.vmap(train_fn, in_axes=(0, None)))(keys, PARAMS)
  for i in range(2):
    alone, alone_metrics = _train_program()(keys[i], PARAMS)
    _close(jax.tree.map(lambda x: x[i], both.params), alone.params)
    np.testing.assert_array_equal(np.asarray(metrics["agent_steps"][i]), np.asarray(alone_metrics["agent_steps"]))


def test_make_sft_run_matches_its_steps_in_any_chunking_and_feeds_make_train():
  sft_rollout = dataclasses.replace(ROLLOUT, num_tasks=4, episodes_per_task=1)
  sft_optim = train.OptimConfig(actor_lr=3e-3)
  run = train.make_sft_run(MODEL, sft_optim, ENV, sft_rollout, chunk_size=2, compiler_options=FAST)
  chunks = []
  seen = []

  def on_chunk(done, m, chunk_params):
    chunks.append((done, m))
    seen.append(jax.tree.map(np.array, chunk_params))  # a copy: the next chunk donates them

  params, metrics = run(jax.random.key(1)[None], PARAMS, 3, on_chunk=on_chunk)
  assert metrics["nll"].shape == (1, 3)
  assert [done for done, _ in chunks] == [2, 3] and [m["nll"].shape for _, m in chunks] == [(1, 2), (1, 1)]
  assert float(metrics["nll"][0, -1]) < float(metrics["nll"][0, 0])
  # The same three steps one by one.
  step = _jit(train.make_sft_iteration(MODEL, sft_optim, ENV, sft_rollout))
  state = train.init_sft_state(MODEL, sft_optim, jax.random.key(1))
  for i in range(3):
    state, step_metrics = step(state, PARAMS)
    assert float(step_metrics["nll"]) == pytest.approx(float(metrics["nll"][0, i]), rel=1e-4)
    if i == 1:  # the first chunk's callback saw the params after step 2
      _close(state.params["policy"], jax.tree.map(lambda x: x[0], seen[0]))
  _close(jax.tree.map(lambda x: x[0], seen[1]), jax.tree.map(lambda x: x[0], params))
  params = jax.tree.map(lambda x: x[0], params)
  _close(state.params["policy"], params)
  # A warm start seeds make_train (a fresh value head on top of the SFT trunk).
  rl_state, _ = _train_program()(jax.random.key(2), PARAMS, params)
  assert set(rl_state.params["policy"]) == set(params) | {"value_head"}


def test_evaluate_scores_greedy_and_sampled_on_the_same_tasks():
  evaluate = _jit(train.make_evaluate(MODEL, ENV, ROLLOUT, 6))
  trunk = train.init_sft_state(MODEL, OPTIM, jax.random.key(4)).params["policy"]
  metrics = evaluate(trunk, PARAMS, jax.random.key(9))
  config = dataclasses.replace(ROLLOUT, num_tasks=6, episodes_per_task=1)
  for greedy, name in ((True, "success"), (False, "success_sampled")):
    run = _sample_program(dataclasses.replace(config, greedy=greedy))
    batch, info = run(trunk, PARAMS, jax.random.key(9))
    assert float(metrics[name]) == pytest.approx(float(np.mean(info.success)))
    if greedy:
      assert float(metrics["return"]) == pytest.approx(float(np.mean(batch.episode_returns())))
  with pytest.raises(ValueError, match=r"^eval\.num_episodes: must be an int >= 1, got 0"):
    train.make_evaluate(MODEL, ENV, ROLLOUT, 0)
  # A bad rollout field is named once under its section (it once read "eval.rollout.rollout.max_len").
  with pytest.raises(ValueError, match=r"^eval\.rollout\.max_len: 64 cannot hold"):
    train.make_evaluate(MODEL, ENV, dataclasses.replace(ROLLOUT, max_len=64), 4)
  with pytest.raises(ValueError, match=r"^sft\.rollout\.max_len: 64 cannot hold"):
    train.make_sft_iteration(MODEL, OPTIM, ENV, dataclasses.replace(ROLLOUT, max_len=64))


def test_logprobs_are_untempered_so_the_first_ratio_is_one_at_temperature_0_7():
  """EpisodeBatch.logprobs hold the acting model's untempered log-probs, the quantity the learner recomputes: at
  temperature 0.7 the first minibatch's ratios are exactly 1, while the tempered log-probs it sampled from differ."""
  config = dataclasses.replace(ROLLOUT, temperature=0.7)
  trunk = train.init_sft_state(MODEL, OPTIM, jax.random.key(4)).params["policy"]
  batch, _ = _sample_program(config)(trunk, PARAMS, jax.random.key(5))
  logits, _, _ = Transformer(MODEL).apply({"params": trunk}, batch.tokens)
  mask = np.asarray(batch.action_mask)
  untempered = np.asarray(losses.shifted_logprobs(logits, batch.tokens))[mask]
  tempered = np.asarray(losses.shifted_logprobs(logits / 0.7, batch.tokens))[mask]
  np.testing.assert_allclose(np.asarray(batch.logprobs)[mask], untempered, atol=1e-4)
  assert np.abs(tempered - untempered).max() > 0.05  # storing the sampling distribution's would move the ratio
  one_step = dataclasses.replace(UPDATE, epochs=1, minibatches=1)
  state = train.init_train_state(MODEL, one_step, OPTIM, jax.random.key(0), policy_params=trunk)
  _, metrics = train.make_update(MODEL, one_step, OPTIM, compiler_options=FAST)(state, batch)
  for name in ("ratio_mean", "ratio_min", "ratio_max"):
    assert float(metrics[name]) == pytest.approx(1.0, abs=1e-4), name
  assert float(metrics["clip_frac"]) == 0.0


def test_make_train_checks_before_compiling():
  with pytest.raises(ValueError, match=r"^rollout\.max_len: 64 cannot hold"):
    train.make_train(MODEL, ENV, dataclasses.replace(ROLLOUT, max_len=64), UPDATE, OPTIM, 1)
  with pytest.raises(ValueError, match=r"^update\.minibatches: 3 does not divide the batch size 4"):
    train.make_train(MODEL, ENV, ROLLOUT, dataclasses.replace(UPDATE, minibatches=3), OPTIM, 1)
  with pytest.raises(ValueError, match=r"^rollout\.max_len: 512 exceeds the model's max_position_embeddings 256"):
    train.make_train(MODEL, ENV, dataclasses.replace(ROLLOUT, max_len=512), UPDATE, OPTIM, 1)
  with pytest.raises(ValueError, match=r"^train\.num_iterations: must be an int >= 1, got 0"):
    train.make_train(MODEL, ENV, ROLLOUT, UPDATE, OPTIM, 0)


def test_task_pool_draws_every_task_from_the_pool():
  """With a pool, each iteration's tasks are pool tasks (the first observations say which), and evaluate scores
  given task keys exactly like a rollout on them."""
  pool = train.task_pool_keys(5, 3)
  iteration = _jit(train.make_train_iteration(MODEL, ENV, ROLLOUT, UPDATE, OPTIM, pool))
  first_obs = []
  for k in pool:
    _, obs, obs_len = ENV.reset(k, PARAMS)
    first_obs.append(np.asarray(obs)[:int(obs_len)])
  assert len({obs.tobytes() for obs in first_obs}) == 3  # three different tasks
  state = train.init_train_state(MODEL, UPDATE, OPTIM, jax.random.key(0))
  rng, rollout_key = jax.random.split(state.key)
  index = jax.random.choice(jax.random.fold_in(rollout_key, 1), 3, (ROLLOUT.num_tasks,), replace=False)
  trunk = {k: v for k, v in state.params["policy"].items() if k != "value_head"}
  batch, _ = _sample_program()(trunk, PARAMS, rollout_key, 0, pool[index])
  for row in range(ROLLOUT.batch_size):
    task = index[row // ROLLOUT.episodes_per_task]
    np.testing.assert_array_equal(np.asarray(batch.tokens[row, :len(first_obs[task])]), first_obs[task])
  _, metrics = iteration(state, PARAMS)
  assert float(metrics["agent_steps"]) == float(np.sum(batch.step_mask))
  with pytest.raises(ValueError, match=r"^train\.task_pool: must be an int >= 1, got 0"):
    train.task_pool_keys(5, 0)


def test_host_loop_iteration_equals_the_jitted_iteration():
  """The same lookup_qa tasks through host environments (`JaxEnvAsHost` in a `HostEnvPool`) and greedy decoding:
  the host loop's iteration gives the jitted iteration's episodes and update."""
  from stepjax.envs import host

  config = dataclasses.replace(ROLLOUT, greedy=True, max_obs_len=ENV.max_obs_len)
  state = train.init_train_state(MODEL, UPDATE, OPTIM, jax.random.key(6))
  state_copy = jax.tree.map(lambda x: x.copy(), state)
  jitted, jit_metrics = _jit(train.make_train_iteration(MODEL, ENV, config, UPDATE, OPTIM))(state, PARAMS)
  # The reset keys the jitted iteration used: the first split of its rollout key.
  rollout_key = jax.random.split(state_copy.key)[1]
  keys, groups = rollout.task_keys_and_groups(jax.random.split(rollout_key)[0], config)
  envs = [host.JaxEnvAsHost(ENV, PARAMS, seed_to_key=lambda row: keys[row]) for _ in range(config.batch_size)]
  iteration = train.make_host_train_iteration(MODEL, config, TOK, UPDATE, OPTIM, compiler_options=FAST)
  with host.HostEnvPool(envs) as pool:
    hosted, host_metrics = iteration(state_copy, pool, list(range(config.batch_size)), np.asarray(groups))
  for name in ("agent_steps", "action_tokens", "success_rate", "return_mean", "context_len"):
    assert host_metrics[name] == pytest.approx(float(jit_metrics[name])), name
  assert host_metrics["loss"] == pytest.approx(float(jit_metrics["loss"]), rel=1e-3, abs=1e-5)
  _close(hosted.params, jitted.params)
