"""The data contract: validation, critic read-outs and the lossless EpisodeBatch <-> StepRows conversion."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import types
from stepjax.testing import random_episode_batch

B, L, S = 12, 96, 6


def _batches():
  return [random_episode_batch(seed, B, L, S) for seed in range(4)] + [random_episode_batch(9, B, L, S, fill=True)]


def _assert_batches_equal(a, b):
  for field in dataclasses.fields(types.EpisodeBatch):
    x, y = np.asarray(getattr(a, field.name)), np.asarray(getattr(b, field.name))
    np.testing.assert_array_equal(x, y, err_msg=field.name)
    assert x.dtype == y.dtype, field.name


def test_random_batches_validate():
  for batch in _batches():
    batch.validate()
    jax.tree_util.tree_map(jnp.asarray, batch).validate()


@pytest.mark.parametrize("field,mutate,message", [
    ("step_ids", lambda x: x.replace(step_ids=np.where(x.step_ids == 0, 1, x.step_ids)), "step_ids"),
    ("action_mask", lambda x: x.replace(action_mask=~x.action_mask), "action_mask"),
    ("logprobs", lambda x: x.replace(logprobs=x.logprobs - 1.0), "logprobs"),
    ("step_mask", lambda x: x.replace(step_mask=x.step_mask & (np.arange(S) != 0)), "step_mask"),
    ("truncated", lambda x: x.replace(terminated=np.ones_like(x.terminated), truncated=np.ones_like(x.truncated)),
     "truncated"),
    ("seq_len", lambda x: x.replace(seq_len=x.seq_len + L), "seq_len"),
    ("tokens shape", lambda x: x.replace(tokens=x.tokens[:, :-1]), "action_mask: expected shape"),
    ("logprobs dtype", lambda x: x.replace(logprobs=x.logprobs.astype(np.int32)), "logprobs"),
    ("step_mask dtype", lambda x: x.replace(step_mask=x.step_mask.astype(np.float32)), "step_mask"),
    ("group_id shape", lambda x: x.replace(group_id=x.group_id[:-1]), "group_id"),
    ("tokens rank", lambda x: x.replace(tokens=x.tokens[0]), r"tokens: expected a rank-2 \[B, L\] array"),
    ("step_ids unsigned", lambda x: x.replace(step_ids=x.step_ids.astype(np.uint32)),
     "step_ids: expected a signed int dtype, got uint32"),
    ("unsigned tokens are fine", lambda x: x.replace(tokens=x.tokens.astype(np.uint32), seq_len=x.seq_len + L),
     "seq_len: must lie in"),
])
def test_validate_names_the_field(field, mutate, message):
  batch = random_episode_batch(1, B, L, S, fill=True)
  with pytest.raises(ValueError, match="^" + message) as error:
    mutate(batch).validate()
  assert "\n" not in str(error.value)


def test_step_rows_validate_names_the_field():
  rows = types.to_step_rows(random_episode_batch(1, B, L, S), prompt_len=L, response_len=8, observation_len=8)
  rows.validate()
  for mutate, message in [
      (lambda r: r.replace(prompt=r.prompt[0]), r"prompt: expected a rank-2 \[N, P\] array"),
      (lambda r: r.replace(reward=r.reward.astype(np.int32)), "reward: expected a float dtype"),
      (lambda r: r.replace(row_mask=r.row_mask[:-1]), "row_mask: expected shape"),
      (lambda r: r.replace(prompt_mask=r.prompt_mask[:, ::-1]), "prompt_mask: prompts must be left-padded"),
  ]:
    with pytest.raises(ValueError, match="^" + message) as error:
      mutate(rows).validate()
    assert "\n" not in str(error.value)


def test_validate_under_jit_checks_shapes_only():
  batch = random_episode_batch(2, B, L, S)

  @jax.jit
  def f(b):
    b.validate()
    return b.tokens.sum()

  f(batch)
  with pytest.raises(ValueError, match="logprobs"):
    f(batch.replace(logprobs=batch.logprobs[:, :4]))


def test_critic_readouts_match_numpy():
  rng = np.random.default_rng(0)
  for batch in _batches():
    values = rng.normal(size=(B, L)).astype(np.float32)
    step_v = np.zeros((B, S), np.float32)
    token_v = np.zeros((B, L), np.float32)
    token_r = np.zeros((B, L), np.float32)
    for i in range(B):
      for t in range(S):
        if batch.step_mask[i, t]:
          start, n = batch.step_start[i, t], batch.step_len[i, t]
          step_v[i, t] = values[i, start - 1]
          token_r[i, start + n - 1] = batch.step_rewards[i, t]
      for p in range(1, L):
        if batch.action_mask[i, p]:
          token_v[i, p] = values[i, p - 1]
    np.testing.assert_array_equal(batch.step_values(values), step_v)
    np.testing.assert_array_equal(batch.token_values(values), token_v)
    np.testing.assert_array_equal(batch.token_rewards(), token_r)
    np.testing.assert_array_equal(batch.bootstrap_values(values), values[np.arange(B), batch.bootstrap_pos])
    np.testing.assert_allclose(batch.episode_returns(), np.where(batch.step_mask, batch.step_rewards, 0).sum(1),
                               rtol=1e-6)


def test_step_rows_layout_matches_numpy():
  batch = random_episode_batch(3, B, L, S)
  p, r, o = 40, 6, 5
  assert types.step_rows_fit(batch, prompt_len=L, response_len=r, observation_len=o)
  rows = types.to_step_rows(batch, prompt_len=L, response_len=r, observation_len=o).validate()
  for i in range(B):
    for t in range(S):
      n = i * S + t
      assert rows.traj_id[n] == i and rows.step_index[n] == t
      if not batch.step_mask[i, t]:
        assert not rows.row_mask[n] and not rows.response_mask[n].any() and not rows.prompt_mask[n].any()
        continue
      start, length = batch.step_start[i, t], batch.step_len[i, t]
      nxt = batch.step_start[i, t + 1] if t + 1 < S and batch.step_mask[i, t + 1] else batch.seq_len[i]
      prompt = np.asarray(rows.prompt[n])[np.asarray(rows.prompt_mask[n])]
      np.testing.assert_array_equal(prompt, batch.tokens[i, :start])
      np.testing.assert_array_equal(np.asarray(rows.response[n])[:length], batch.tokens[i, start:start + length])
      np.testing.assert_array_equal(np.asarray(rows.response_logprobs[n])[:length],
                                    batch.logprobs[i, start:start + length])
      obs = np.asarray(rows.observation[n])[np.asarray(rows.observation_mask[n])]
      np.testing.assert_array_equal(obs, batch.tokens[i, start + length:nxt])
      assert rows.reward[n] == batch.step_rewards[i, t]
  # Too narrow a prompt window is reported by step_rows_fit, not silently accepted.
  assert not types.step_rows_fit(batch, prompt_len=p // 10, response_len=r, observation_len=o)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_round_trip_episode_batch_to_step_rows_and_back(seed):
  batch = random_episode_batch(seed, B, L, S, fill=seed == 4)
  convert = jax.jit(lambda b: types.from_step_rows(
      types.to_step_rows(b, prompt_len=L, response_len=8, observation_len=8),
      num_episodes=B, max_len=L, max_steps=S))
  back = convert(batch)
  # Episodes without a single step have nothing in StepRows to carry their prompt: only compare the rest.
  has_steps = batch.step_mask.any(axis=1)
  empty = batch.replace(tokens=np.where(has_steps[:, None], batch.tokens, 0),
                        seq_len=np.where(has_steps, batch.seq_len, 0),
                        terminated=np.where(has_steps, batch.terminated, False),
                        truncated=np.where(has_steps, batch.truncated, False),
                        group_id=np.where(has_steps, batch.group_id, 0),
                        bootstrap_pos=np.where(has_steps, batch.bootstrap_pos, 0))
  _assert_batches_equal(back, empty)
  back.validate()


def test_round_trip_step_rows_to_episode_batch_and_back():
  batch = random_episode_batch(7, B, L, S, fill=True)
  widths = dict(prompt_len=L, response_len=8, observation_len=8)
  rows = types.to_step_rows(batch, **widths)
  again = types.to_step_rows(types.from_step_rows(rows, num_episodes=B, max_len=L, max_steps=S), **widths)
  for field in dataclasses.fields(types.StepRows):
    np.testing.assert_array_equal(np.asarray(getattr(rows, field.name)), np.asarray(getattr(again, field.name)),
                                  err_msg=field.name)


def test_round_trip_keeps_negative_group_ids():
  batch = random_episode_batch(5, B, L, S, fill=True)
  batch = batch.replace(group_id=batch.group_id - 100)
  back = types.from_step_rows(types.to_step_rows(batch, prompt_len=L, response_len=8, observation_len=8),
                              num_episodes=B, max_len=L, max_steps=S)
  np.testing.assert_array_equal(np.asarray(back.group_id), batch.group_id)
