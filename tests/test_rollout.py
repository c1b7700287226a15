"""The jitted episode loop on a small counting environment defined here (independent of the shipped envs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import rollout as rollout_lib
from stepjax.models import transformer
from stepjax.tokenizers import ByteTokenizer

from helpers import CountEnv

TOK = ByteTokenizer()


ENV = CountEnv(TOK)
MODEL_CONFIG = transformer.get_config("tiny", dtype="float32", vocab_size=TOK.vocab_size)
MODEL = transformer.Transformer(MODEL_CONFIG)
PARAMS = transformer.init_params(MODEL_CONFIG, jax.random.key(0))
CONFIG = rollout_lib.RolloutConfig(num_tasks=4, episodes_per_task=2, max_steps=6, max_len=160, max_action_len=8,
                                   stop_ids=(TOK.end_of_step_id, TOK.eos_id), pad_id=TOK.pad_id)


@functools.lru_cache(maxsize=None)
def _rollout(config, actor):
  return jax.jit(rollout_lib.make_rollout(MODEL, ENV, config, actor))


def _full_logprobs(tokens):
  logits, _, _ = MODEL.apply({"params": PARAMS}, jnp.asarray(tokens))
  logp = jax.nn.log_softmax(logits, -1)
  out = np.zeros(tokens.shape, np.float32)
  out[:, 1:] = np.take_along_axis(np.asarray(logp[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  return out


def _replay_on_host(batch, row, params):
  """Re-runs the environment on the host with the batch's own action tokens; returns the observation id lists."""
  keys, _ = rollout_lib.task_keys_and_groups(jax.random.split(jax.random.key(7))[0], CONFIG)
  state, obs, n = ENV.reset(keys[row], params)
  observations = [list(np.asarray(obs[:n]))]
  for t in range(CONFIG.max_steps):
    if not batch.step_mask[row, t]:
      break
    start, length = batch.step_start[row, t], batch.step_len[row, t]
    action = np.zeros(ENV.max_action_len, np.int32)
    action[:min(length, ENV.max_action_len)] = batch.tokens[row, start:start + min(length, ENV.max_action_len)]
    state, obs, n, reward, *_ = ENV.step(jax.random.key(0), state, jnp.asarray(action), length, params)
    observations.append(list(np.asarray(obs[:n])))
    assert np.isclose(float(reward), batch.step_rewards[row, t])
  return observations


def _observations_in_batch(batch, row):
  out, pos = [], 0
  for t in range(CONFIG.max_steps + 1):
    valid = t < CONFIG.max_steps and batch.step_mask[row, t]
    end = batch.step_start[row, t] if valid else batch.seq_len[row]
    out.append(list(batch.tokens[row, pos:end]))
    if not valid:
      break
    pos = batch.step_start[row, t] + batch.step_len[row, t]
  return out


def test_expert_replay_is_token_exact_and_valid():
  batch, info = _rollout(CONFIG, "expert")(PARAMS, ENV.default_params(), jax.random.key(7))
  batch = jax.tree_util.tree_map(np.asarray, batch).validate()
  assert np.asarray(info.success).all() and (np.asarray(info.invalid_steps) == 0).all()
  np.testing.assert_array_equal(info.parsed_steps, batch.step_mask.sum(1))
  assert batch.terminated.all() and not batch.truncated.any()
  np.testing.assert_allclose(batch.episode_returns(), 1.0)
  for row in range(CONFIG.batch_size):
    assert _observations_in_batch(batch, row) == _replay_on_host(batch, row, ENV.default_params())
    # The expert's actions are exactly `next` x target, then `done`, each ending with end-of-step.
    texts = [TOK.decode(batch.tokens[row, s:s + n]) for s, n, m in
             zip(batch.step_start[row], batch.step_len[row], batch.step_mask[row]) if m]
    assert texts[-1] == "done<|end_of_step|>" and set(texts[:-1]) <= {"next<|end_of_step|>"}
  # Behaviour log-probs of replayed tokens are the policy's, as a packed forward computes them.
  full = _full_logprobs(batch.tokens)
  np.testing.assert_allclose(batch.logprobs[batch.action_mask], full[batch.action_mask], atol=1e-5)
  # Episodes of one task share the task: same first observation within a group.
  first = batch.step_start[:, 0]
  for g in np.unique(batch.group_id):
    rows = np.flatnonzero(batch.group_id == g)
    assert len(rows) == 2 and first[rows[0]] == first[rows[1]]
    np.testing.assert_array_equal(batch.tokens[rows[0], :first[rows[0]]], batch.tokens[rows[1], :first[rows[1]]])


def test_sampled_rollout_matches_packed_forward_and_env():
  config = CONFIG.__class__(**{**CONFIG.__dict__, "temperature": 1.0})
  batch, info = _rollout(config, "model")(PARAMS, ENV.default_params(), jax.random.key(7))
  batch = jax.tree_util.tree_map(np.asarray, batch).validate()
  full = _full_logprobs(batch.tokens)
  np.testing.assert_allclose(batch.logprobs[batch.action_mask], full[batch.action_mask], atol=1e-5)
  for row in range(CONFIG.batch_size):
    assert _observations_in_batch(batch, row) == _replay_on_host(batch, row, ENV.default_params())
  # An untrained model speaks garbage: every step is invalid, so each row runs until the step budget or until the
  # context has no room for another whole step (both truncate).
  assert not np.asarray(info.success).any() and batch.truncated.all()
  # Garbage never parses: every step taken is invalid.
  np.testing.assert_array_equal(info.invalid_steps, batch.step_mask.sum(1))
  assert not np.asarray(info.parsed_steps).any()
  steps = batch.step_mask.sum(1)
  no_room = batch.seq_len + CONFIG.max_action_len + ENV.max_obs_len > CONFIG.max_len
  assert ((steps == CONFIG.max_steps) | no_room).all()
  np.testing.assert_allclose(batch.step_rewards[batch.step_mask], -0.1, rtol=1e-6)


def test_context_overflow_truncates_without_dropping_tokens():
  # Room for the first observation, one step with the largest observation, and 15 tokens more: the expert's short
  # steps (10 tokens each) fit twice, so 1-count tasks (2 steps) finish and the others run out of context.
  max_len = 2 * ENV.max_obs_len + CONFIG.max_action_len + 15
  config = CONFIG.__class__(**{**CONFIG.__dict__, "max_len": max_len})
  batch, info = _rollout(config, "expert")(PARAMS, ENV.default_params().replace(max_steps=8), jax.random.key(7))
  batch = jax.tree_util.tree_map(np.asarray, batch).validate()
  # Every episode either finished its task or stopped exactly when no room for a whole step was left.
  np.testing.assert_array_equal(batch.truncated, ~batch.terminated)
  no_room = batch.seq_len + config.max_action_len + ENV.max_obs_len > max_len
  np.testing.assert_array_equal(batch.truncated, no_room & ~batch.terminated)
  assert batch.truncated.any() and batch.terminated.any() and (batch.seq_len <= max_len).all()
  for row in range(config.batch_size):
    assert _observations_in_batch(batch, row) == _replay_on_host(batch, row, ENV.default_params())
  # Rows out of context keep stepping the scan, but their environments (which had not ended: nothing was
  # terminated or truncated by them) are marked done, so `Environment.step` is the one mask: nothing past a row's
  # last step is written, rewarded, flagged or counted.
  assert (batch.tokens[np.arange(max_len)[None] >= batch.seq_len[:, None]] == 0).all()
  assert not batch.step_rewards[~batch.step_mask].any()
  np.testing.assert_array_equal(np.asarray(info.success), batch.terminated)
  np.testing.assert_array_equal(info.parsed_steps, batch.step_mask.sum(1))
  assert not np.asarray(info.invalid_steps).any()


def test_step_budget_truncates():
  config = CONFIG.__class__(**{**CONFIG.__dict__, "max_steps": 2})
  batch, info = _rollout(config, "expert")(PARAMS, ENV.default_params(), jax.random.key(7))
  batch = jax.tree_util.tree_map(np.asarray, batch).validate()
  needs = batch.step_mask.sum(1)
  assert (needs <= 2).all()
  np.testing.assert_array_equal(batch.terminated, np.asarray(info.success))
  np.testing.assert_array_equal(batch.truncated, ~batch.terminated)
  np.testing.assert_array_equal(batch.bootstrap_pos, batch.seq_len - 1)


@pytest.mark.parametrize("field,kwargs,message", [
    ("max_len", {"max_len": 40}, "rollout.max_len: 40 cannot hold"),
    ("max_steps", {"max_steps": 0}, "rollout.max_steps: must be an int >= 1"),
    ("temperature", {"temperature": 0.0}, "sampling.temperature"),
])
def test_config_errors_before_compiling(field, kwargs, message):
  config = CONFIG.__class__(**{**CONFIG.__dict__, **kwargs})
  with pytest.raises(ValueError, match=message):
    rollout_lib.make_rollout(MODEL, ENV, config)
  with pytest.raises(ValueError, match="rollout.actor: unknown 'human'; allowed: model, expert"):
    rollout_lib.make_rollout(MODEL, ENV, CONFIG, "human")


def test_rollout_convenience_compiles_once():
  """`rollout.rollout` caches its jitted program: a second call with new params, env params and key does not
  retrace (the environment's reset runs on the host only while tracing)."""
  traces = []

  class TracedCountEnv(CountEnv):
    def reset(self, key, params):
      traces.append(key)
      return super().reset(key, params)

  env = TracedCountEnv(TOK)
  config = CONFIG.__class__(**{**CONFIG.__dict__, "num_tasks": 2, "episodes_per_task": 1, "max_steps": 2})
  first, _ = rollout_lib.rollout(PARAMS, env, env.default_params(), jax.random.key(1), config, MODEL, "expert")
  params = jax.tree_util.tree_map(lambda x: x * 0.5, PARAMS)
  second, _ = rollout_lib.rollout(params, env, env.default_params().replace(max_steps=1), jax.random.key(2), config,
                                  MODEL, "expert")
  assert len(traces) == 1
  # The cached program still computes with the new arguments: a budget of 1 truncates every episode after a step.
  assert np.asarray(second.truncated).all() and (np.asarray(second.step_mask).sum(1) == 1).all()
  assert not np.array_equal(np.asarray(first.logprobs), np.asarray(second.logprobs))


def test_host_loop_reproduces_the_jitted_loop():
  """Greedy decoding, the same environment behind JaxEnvAsHost: the host loop gives the very same EpisodeBatch."""
  from stepjax.envs.host import HostEnvPool, JaxEnvAsHost

  config = CONFIG.__class__(**{**CONFIG.__dict__, "greedy": True, "max_obs_len": ENV.max_obs_len})
  key = jax.random.key(11)
  jitted, jitted_info = _rollout(config, "model")(PARAMS, ENV.default_params(), key)
  reset_keys, groups = rollout_lib.task_keys_and_groups(jax.random.split(key)[0], config)
  envs = [JaxEnvAsHost(ENV, ENV.default_params(), seed_to_key=lambda row: reset_keys[row])
          for _ in range(config.batch_size)]
  with HostEnvPool(envs) as pool:
    hosted, info = rollout_lib.make_host_rollout(MODEL, config, TOK)(PARAMS, pool, list(range(config.batch_size)),
                                                                     key, group_ids=groups)
  for field in ("tokens", "action_mask", "step_ids", "step_start", "step_len", "step_rewards", "step_mask", "seq_len",
                "terminated", "truncated", "group_id", "bootstrap_pos"):
    np.testing.assert_array_equal(np.asarray(getattr(hosted, field)), np.asarray(getattr(jitted, field)), err_msg=field)
  np.testing.assert_allclose(np.asarray(hosted.logprobs), np.asarray(jitted.logprobs), atol=1e-5)
  assert not np.asarray(info.obs_overflow).any()
  for field in ("success", "parsed_steps", "invalid_steps"):
    np.testing.assert_array_equal(np.asarray(getattr(info, field)), np.asarray(getattr(jitted_info, field)),
                                  err_msg=field)
