"""stepjax.segments against plain numpy loops written here, on ragged random inputs: rows without valid steps or
without action tokens, valid steps without tokens, and step ids outside [0, S) (other negatives, ids >= S)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import credit, losses, segments
from stepjax.testing import np_groups, np_whiten, random_episode_batch

B, L, S = 5, 24, 6
SEEDS = range(4)


def random_segments(seed):
  """(action_mask [B, L], step_ids [B, L] int32, step_mask [B, S], x [B, L] float32 with NaN off the action mask)."""
  rng = np.random.default_rng(seed)
  step_ids = rng.integers(-3, S + 3, size=(B, L)).astype(np.int32)  # -3..-1 and S..S+2 belong to no step
  action_mask = rng.random((B, L)) < 0.7
  step_mask = rng.random((B, S)) < 0.7
  step_mask[0] = False  # a row without valid steps
  action_mask[1] = False  # a row without action tokens
  step_mask[2, 0] = True
  step_ids[2] = np.where(step_ids[2] == 0, 1, step_ids[2])  # a valid step without tokens
  x = np.where(action_mask, rng.normal(size=(B, L)), np.nan).astype(np.float32)
  return action_mask, step_ids, step_mask, x


def np_step_stats(action_mask, step_ids, step_mask, x):
  """Token loop: (count, sum, mean) per step [B, S] over action tokens with an id in [0, S); sum and mean are 0 on
  steps that are invalid or have no tokens."""
  count, total = np.zeros((B, S)), np.zeros((B, S))
  for b in range(B):
    for p in range(L):
      t = step_ids[b, p]
      if action_mask[b, p] and 0 <= t < S:
        count[b, t] += 1
        total[b, t] += float(x[b, p])
  valid = step_mask & (count > 0)
  return count, np.where(valid, total, 0.0), np.where(valid, total / np.maximum(count, 1), 0.0)


def np_broadcast(per_step, step_ids, token_mask):
  out = np.zeros(step_ids.shape)
  for b in range(step_ids.shape[0]):
    for p in range(step_ids.shape[1]):
      t = step_ids[b, p]
      if token_mask[b, p] and 0 <= t < per_step.shape[1]:
        out[b, p] = per_step[b, t]
  return out


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def assert_zero_outside(out, mask):
  out = np.asarray(out)
  assert np.all(out[~np.asarray(mask)] == 0.0), "masked positions must be exactly 0"


# ------------------------------------------------------------------------------------------------------
# Step segments.
# ------------------------------------------------------------------------------------------------------


@jax.jit
def segment_outputs(action_mask, step_ids, step_mask, x, x_steps):
  seg = segments.StepSegments.make(action_mask, step_ids, step_mask)
  x = jnp.where(action_mask, x, 0.0)  # callers mask garbage before any arithmetic
  return dict(count=seg.count, valid=seg.valid, in_step=seg.in_step, sum=seg.sum(x), mean=seg.mean(x),
              broadcast=seg.broadcast(x_steps), log_mean=seg.log_ratios(x, "mean"), log_sum=seg.log_ratios(x, "sum"),
              # <broadcast(y), x> = <y, sum(x)>: broadcast's VJP sums over each step's tokens
              vjp=jax.grad(lambda y: jnp.sum(seg.broadcast(y) * x))(x_steps))


def test_step_segments_match_numpy_loops():
  for seed in SEEDS:
    action_mask, step_ids, step_mask, x = random_segments(seed)
    x_steps = np.random.default_rng(seed).normal(size=(B, S)).astype(np.float32)
    got = segment_outputs(action_mask, step_ids, step_mask, x, x_steps)
    count, total, mean = np_step_stats(action_mask, step_ids, step_mask, x)
    in_step = action_mask & (step_ids >= 0) & (step_ids < S)
    assert got["count"].dtype == jnp.float32
    np.testing.assert_array_equal(got["count"], count)
    np.testing.assert_array_equal(got["valid"], step_mask & (count > 0))
    np.testing.assert_array_equal(got["in_step"], in_step)
    assert_close(got["sum"], total)
    assert_close(got["mean"], mean)
    assert_close(got["log_sum"], total)
    assert_close(got["log_mean"], mean)
    # A step's value reaches its tokens whether or not the step is valid (losses mask invalid steps first).
    assert_close(got["broadcast"], np_broadcast(x_steps, step_ids, in_step))
    all_steps = np.ones((B, S), bool)  # the adjoint sums every step's tokens, valid or not
    assert_close(got["vjp"], np_step_stats(action_mask, step_ids, all_steps, np.where(action_mask, x, 0))[1])
    assert step_mask[2, 0] and not got["valid"][2, 0]  # the valid step without tokens
    assert not np.asarray(got["valid"])[:2].any()  # no valid steps / no action tokens


def test_broadcast_to_tokens_matches_numpy():
  batch = random_episode_batch(3)
  per_step = np.random.default_rng(3).normal(size=batch.step_mask.shape).astype(np.float32)
  out = segments.broadcast_to_tokens(per_step, batch.step_ids)
  expected = np.zeros(batch.tokens.shape)
  for b in range(batch.batch_size):
    for p in range(batch.max_len):
      if batch.step_ids[b, p] >= 0:
        expected[b, p] = per_step[b, batch.step_ids[b, p]]
  assert_close(out, expected)
  assert_zero_outside(out, batch.step_ids >= 0)


def test_broadcast_to_tokens_leading_dims_out_of_range_ids_and_no_steps():
  for seed in SEEDS:
    _, step_ids, _, _ = random_segments(seed)
    per_step = np.random.default_rng(seed).normal(size=(B, S)).astype(np.float32)
    fn = jax.jit(segments.broadcast_to_tokens)
    want = np_broadcast(per_step, step_ids, np.ones((B, L), bool))
    assert_close(fn(per_step, step_ids), want)
    stacked = fn(np.stack([per_step, 2 * per_step]), np.stack([step_ids, step_ids]))  # [2, B, S], [2, B, L]
    assert_close(stacked, np.stack([want, 2 * want]))
  assert_close(segments.broadcast_to_tokens(np.zeros((B, 0), np.float32), step_ids), np.zeros((B, L)))


def test_mean_per_step_matches_numpy_loop():
  fn = jax.jit(segments.mean_per_step)
  for seed in SEEDS:
    _, step_ids, step_mask, x = random_segments(seed)
    x = np.nan_to_num(x)
    got = fn(x, step_ids, step_mask)
    # Every token with an id in [0, S) counts (mean_per_step has no action mask: credit's step_ids >= 0 is it).
    _, _, want = np_step_stats(np.ones((B, L), bool), step_ids, step_mask, x)
    assert_close(got, want)
    assert_zero_outside(got, step_mask)


# ------------------------------------------------------------------------------------------------------
# Masked statistics.
# ------------------------------------------------------------------------------------------------------


@jax.jit
def masked_statistics(x, mask):
  return dict(mean=segments.masked_mean(x, mask), mean_empty_1=segments.masked_mean(x, mask, empty=1.0),
              moments=segments.masked_moments(x, mask), stats=segments.masked_stats(x, mask))


@jax.jit
def learner_stats(x, mask):
  mean = losses.masked_mean(x, mask)
  return segments.masked_stats(x, mask), (mean, jnp.sqrt(losses.masked_mean(jnp.square(x - mean), mask)))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 1.0])
def test_masked_statistics_match_numpy(rate):
  rng = np.random.default_rng(int(rate * 100))
  for _ in range(3):
    mask = rng.random((B, L)) < rate
    x = np.where(mask, 3 * rng.normal(size=(B, L)) + 1, np.nan).astype(np.float32)  # NaN off the mask stays out
    got = masked_statistics(x, mask)
    picked = x[mask].astype(np.float64)
    mean, var = (picked.mean(), picked.var()) if picked.size else (0.0, 0.0)
    assert got["mean"].dtype == got["stats"][0].dtype == got["stats"][1].dtype == jnp.float32
    assert_close(got["mean"], mean)
    assert_close(got["mean_empty_1"], mean if picked.size else 1.0)
    assert_close(got["moments"][0], mean)
    assert_close(got["moments"][1], var, rtol=1e-4)
    assert_close(got["stats"][0], mean)
    assert_close(got["stats"][1], np.sqrt(var), rtol=1e-4)
    # masked_stats is the learner's (mean, sqrt(masked_mean((x - mean)^2))), bit for bit.
    clean = np.where(mask, x, 0.0)
    stats, learner = learner_stats(clean, mask)
    assert [float(v) for v in stats] == [float(v) for v in learner]


def test_masked_whiten_matches_numpy():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 4, 5)) * 3 + 1).astype(np.float32)
  mask = rng.random((3, 4, 5)) < 0.5
  for shift_mean in (True, False):
    out = segments.masked_whiten(x, mask, shift_mean=shift_mean)
    assert_close(out, np_whiten(x, mask, shift_mean))
    assert_zero_outside(out, mask)
  assert_close(segments.masked_whiten(x, np.zeros_like(mask)), np.zeros(x.shape))
  one = np.zeros_like(mask)
  one[1, 2, 3] = True
  assert_close(segments.masked_whiten(x, one), np.zeros(x.shape))  # a single element: variance 0, centred value 0
  out = segments.masked_whiten(jnp.asarray(x, jnp.bfloat16), mask)
  assert out.dtype == jnp.float32  # bfloat16 is whitened in float32
  assert_close(out, np_whiten(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), mask), atol=1e-4)


def test_credit_and_losses_re_export_the_segment_functions():
  assert credit.masked_whiten is segments.masked_whiten
  assert credit.broadcast_to_tokens is segments.broadcast_to_tokens
  assert credit.segment_ids is segments.segment_ids
  assert losses.masked_mean is segments.masked_mean


# ------------------------------------------------------------------------------------------------------
# Group segments.
# ------------------------------------------------------------------------------------------------------


def test_segment_ids_partition_matches_python_dict():
  rng = np.random.default_rng(0)
  fn = jax.jit(lambda a, c, v: segments.segment_ids(a, c, valid=v))
  for _ in range(4):
    first = rng.choice(np.array([-7, 3, 10**9, 123456], np.int32), size=32)
    second = rng.choice(np.array([0, 4_000_000_000], np.uint32), size=32)
    valid = rng.random(32) < 0.8
    ids, count = fn(first, second, valid)
    ids = np.asarray(ids)
    groups = np_groups(list(zip(first.tolist(), second.tolist())), valid)
    assert int(count) == len(groups)
    assert np.all(ids[~valid] == 32)
    assert sorted(set(ids[valid].tolist())) == list(range(len(groups)))
    for members in groups.values():
      assert len(set(ids[members].tolist())) == 1
    assert len({ids[m[0]] for m in groups.values()}) == len(groups)
  ids, count = segments.segment_ids(np.zeros(0, np.int32))
  assert ids.shape == (0,) and int(count) == 0


def test_group_moments_match_numpy():
  rng = np.random.default_rng(1)
  fn = jax.jit(lambda x, keys, valid: segments.group_moments(x, segments.segment_ids(keys, valid=valid)[0], valid))
  for _ in range(4):
    x = rng.normal(size=16).astype(np.float32)
    keys = rng.integers(0, 4, 16).astype(np.int32)
    valid = rng.random(16) < 0.8
    got = fn(x, keys, valid)
    for members in np_groups(keys.tolist(), valid).values():
      picked = x[members].astype(np.float64)
      assert_close(np.asarray(got.size)[members], len(members))
      assert_close(np.asarray(got.mean)[members], picked.mean())
      assert_close(np.asarray(got.std)[members], picked.std(ddof=1) if len(members) > 1 else 0.0)
  tied = fn(np.full(8, 0.3, np.float32), np.zeros(8, np.int32), np.ones(8, bool))
  assert np.all(np.asarray(tied.mean) == np.float32(0.3)) and np.all(np.asarray(tied.std) == 0.0)  # exact


# ------------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------------

_X = np.zeros((B, S), np.float32)
_M = np.ones((B, S), bool)

BAD_INPUTS = [
    ("mask", lambda: segments.masked_whiten(_X, _M[:, :2])),
    ("x", lambda: segments.masked_whiten(_X.astype(np.int32), _M)),
    ("step_ids", lambda: segments.broadcast_to_tokens(_X, _X)),
    ("step_ids", lambda: segments.broadcast_to_tokens(_X, np.zeros((B + 1, L), np.int32))),
    ("per_step", lambda: segments.broadcast_to_tokens(np.float32(1.0), np.zeros(L, np.int32))),
    ("per_token", lambda: segments.mean_per_step(np.zeros(L, np.float32), np.zeros(L, np.int32), _M)),
    ("step_ids", lambda: segments.mean_per_step(np.zeros((B, L), np.float32), np.zeros((B, L)), _M)),
    ("step_mask", lambda: segments.mean_per_step(np.zeros((B, L), np.float32), np.zeros((B, L), np.int32), _M[1:])),
    ("keys", lambda: segments.segment_ids()),
    ("keys", lambda: segments.segment_ids(np.zeros((2, 2), np.int32))),
    ("keys[1]", lambda: segments.segment_ids(np.zeros(4, np.int32), np.zeros(5, np.int32))),
    ("valid", lambda: segments.segment_ids(np.zeros(4, np.int32), valid=np.ones(4, np.int32))),
]


@pytest.mark.parametrize("arg,call", BAD_INPUTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_naming_the_argument(arg, call):
  with pytest.raises(ValueError, match="^" + re.escape(arg) + ": ") as info:
    call()
  assert "\n" not in str(info.value)
