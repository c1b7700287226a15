"""stepjax.credit against plain numpy loops written here (independent of credit.py and of the batch helpers).

Every batch has the default `random_episode_batch` shapes (B=8, L=96, S=6) so each jitted function compiles once.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepjax import credit
from stepjax.testing import np_groups, np_whiten, random_episode_batch

B, L, S = 8, 96, 6
RTOL, ATOL = 1e-5, 1e-5
METHODS = ("scan", "associative")
SEEDS = range(6)


# ------------------------------------------------------------------------------------------------------
# numpy references (float64, explicit loops)
# ------------------------------------------------------------------------------------------------------


def np_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, truncation_as_terminal):
  """Reverse loop over the valid slots of each row only; masked slots are skipped entirely."""
  rows, slots = rewards.shape
  advantages = np.zeros((rows, slots))
  for b in range(rows):
    bootstraps = truncated[b] and not truncation_as_terminal
    next_value = float(bootstrap[b]) if bootstraps else 0.0
    next_advantage = 0.0
    for t in reversed(range(slots)):
      if not mask[b, t]:
        continue
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_advantage = delta + gamma * lam * next_advantage
      next_value = values[b, t]
      advantages[b, t] = next_advantage
  return advantages, np.where(mask, advantages + values, 0.0)


def np_discounted(rewards, mask, gamma):
  """G over valid slots only (discount counts valid slots), terminal at the end."""
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    running = 0.0
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t]:
        running = rewards[b, t] + gamma * running
        out[b, t] = running
  return out


def np_grpo(scores, group_id, valid, normalize_std=True, eps=1e-6):
  out = np.zeros(len(scores))
  for members in np_groups(group_id.tolist(), valid).values():
    x = scores[members].astype(np.float64)
    mean, std = (0.0, 1.0) if len(x) == 1 else (x.mean(), x.std(ddof=1))
    out[members] = (x - mean) / (std + eps) if normalize_std else x - mean
  return out


def np_rloo(scores, group_id, valid):
  out = np.zeros(len(scores))
  for members in np_groups(group_id.tolist(), valid).values():
    for i in members:
      others = [scores[j] for j in members if j != i]
      out[i] = scores[i] - (np.mean(others) if others else 0.0)
  return out


def np_normalize(x, mode, eps=1e-6):
  if len(x) == 1:
    return np.zeros(1)
  centered = x - x.mean()
  return centered / (x.std(ddof=1) + eps) if mode == "mean_std_norm" else centered


class NpBatch:
  """What a batch means, read with loops: per-step values, token values/rewards, bootstrap, observations."""

  def __init__(self, batch, position_values=None):
    x = jax.tree_util.tree_map(np.asarray, batch)
    self.x = x
    self.valid_episode = x.step_mask.any(axis=1)
    self.scores = np.where(x.step_mask, x.step_rewards, 0.0).sum(axis=1)
    self.token_rewards = np.zeros((B, L))
    for b in range(B):
      for t in range(S):
        if x.step_mask[b, t]:
          self.token_rewards[b, x.step_start[b, t] + x.step_len[b, t] - 1] = x.step_rewards[b, t]
    if position_values is not None:
      pv = np.asarray(position_values, np.float64)
      self.step_values = np.zeros((B, S))
      self.token_values = np.zeros((B, L))
      for b in range(B):
        for t in range(S):
          if x.step_mask[b, t]:
            self.step_values[b, t] = pv[b, x.step_start[b, t] - 1]
        for p in range(L):
          if x.action_mask[b, p]:
            self.token_values[b, p] = pv[b, p - 1]
      self.bootstrap = pv[np.arange(B), x.bootstrap_pos]

  def broadcast(self, per_step):
    return np.where(self.x.step_ids >= 0, np.take_along_axis(per_step, np.maximum(self.x.step_ids, 0), 1), 0.0)

  def step_mean(self, per_token):
    out = np.zeros((B, S))
    for b in range(B):
      for t in range(S):
        if self.x.step_mask[b, t]:
          out[b, t] = per_token[b, self.x.step_ids[b] == t].mean()
    return out

  def observation(self, b, t):
    begin = 0 if t == 0 else self.x.step_start[b, t - 1] + self.x.step_len[b, t - 1]
    return tuple(self.x.tokens[b, begin:self.x.step_start[b, t]].tolist())

  def gigpo(self, gamma, omega, mode, eps=1e-6):
    x = self.x
    episode = np.zeros(B)
    for members in np_groups(x.group_id.tolist(), self.valid_episode).values():
      episode[members] = np_normalize(self.scores[members], mode, eps)
    step_returns = np_discounted(x.step_rewards.astype(np.float64), x.step_mask, gamma)
    anchors = {}
    for b in range(B):
      for t in range(S):
        if x.step_mask[b, t]:
          anchors.setdefault((int(x.group_id[b]), self.observation(b, t)), []).append((b, t))
    step = np.zeros((B, S))
    for members in anchors.values():
      rows, cols = zip(*members)
      step[rows, cols] = np_normalize(step_returns[rows, cols], mode, eps)
    return np.where(x.step_mask, episode[:, None] + omega * step, 0.0)


def np_credit(config: credit.CreditConfig, batch, position_values):
  """The whole compute_advantages pipeline from the numpy references: (token advantages, step advantages, returns)."""
  nb = NpBatch(batch, position_values)
  x = nb.x
  per_step = per_token = returns = None
  name = config.estimator
  if name == "step_gae":
    per_step, returns = np_gae(x.step_rewards, nb.step_values, x.step_mask, config.gamma, config.lam, nb.bootstrap,
                               x.truncated, config.truncation_as_terminal)
  elif name == "token_gae":
    per_token, returns = np_gae(nb.token_rewards, nb.token_values, x.action_mask, config.gamma, config.lam,
                                nb.bootstrap, x.truncated, config.truncation_as_terminal)
  elif name == "grpo":
    adv = np_grpo(nb.scores, x.group_id, nb.valid_episode, config.normalize_std, config.group_eps)
    per_step = np.where(x.step_mask, adv[:, None], 0.0)
  elif name == "rloo":
    per_step = np.where(x.step_mask, np_rloo(nb.scores, x.group_id, nb.valid_episode)[:, None], 0.0)
  elif name == "reinforce_pp":
    per_token = np_whiten(np_discounted(nb.token_rewards, x.action_mask, config.gamma), x.action_mask)
  elif name == "reinforce_pp_baseline":
    centered = np.zeros(B)
    for members in np_groups(x.group_id.tolist(), nb.valid_episode).values():
      centered[members] = nb.scores[members] - (nb.scores[members].mean() if len(members) > 1 else 0.0)
    per_token = np_whiten(np.where(x.action_mask, centered[:, None], 0.0), x.action_mask)
  elif name == "gigpo":
    per_step = nb.gigpo(config.gamma, config.gigpo_omega, config.gigpo_mode, config.group_eps)
  if per_token is None:
    if config.whiten == "step":
      per_step = np_whiten(per_step, x.step_mask)
    per_token = nb.broadcast(per_step)
    if config.whiten == "token":
      per_token = np_whiten(per_token, x.action_mask)
      per_step = nb.step_mean(per_token)
  else:
    if config.whiten == "token":
      per_token = np_whiten(per_token, x.action_mask)
    per_step = nb.step_mean(per_token)
  return per_token, per_step, returns


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def assert_zero_outside(out, mask):
  out = np.asarray(out)
  assert np.all(out[~np.asarray(mask)] == 0.0), "masked positions must be exactly 0"


def random_values(seed, shape=(B, L)):
  return np.random.default_rng(1000 + seed).normal(size=shape).astype(np.float32)


def random_gae_inputs(seed, slots, hole_rate=0.35):
  """Rewards, values and a mask with holes (not a prefix) plus per-row bootstrap/truncation and γ, λ."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(B, slots)).astype(np.float32)
  values = rng.normal(size=(B, slots)).astype(np.float32)
  mask = rng.random((B, slots)) > hole_rate
  mask[0] = False  # a row without any valid slot
  bootstrap = rng.normal(size=B).astype(np.float32)
  truncated = rng.random(B) < 0.5
  gamma, lam = (float(v) for v in rng.choice([0.0, 0.5, 0.9, 0.99, 1.0], size=2))
  return rewards, values, mask, bootstrap, truncated, gamma, lam


@functools.partial(jax.jit, static_argnames=("level", "method"))
def jit_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, truncation_as_terminal, *, level, method):
  fn = credit.step_gae if level == "step" else credit.token_gae
  return fn(rewards, values, mask, gamma=gamma, lam=lam, bootstrap_values=bootstrap, truncated=truncated,
            truncation_as_terminal=truncation_as_terminal, method=method)


@functools.partial(jax.jit, static_argnames=("configs",))
def jit_credits(configs, batch, position_values):
  """All configs in one compilation."""
  return tuple(credit.compute_advantages(c, batch, position_values) for c in configs)


# ------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level,slots", [("step", S), ("token", L)])
def test_gae_with_holes_matches_numpy_loop(method, level, slots):
  for seed in SEEDS:
    rewards, values, mask, bootstrap, truncated, gamma, lam = random_gae_inputs(seed, slots)
    for as_terminal in (False, True):
      adv, ret = jit_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, as_terminal, level=level,
                         method=method)
      want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, as_terminal)
      assert_close(adv, want_adv)
      assert_close(ret, want_ret)
      assert_zero_outside(adv, mask)
      assert_zero_outside(ret, mask)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0),
       hole_rate=st.sampled_from([0.0, 0.3, 0.9]), as_terminal=st.booleans(), method=st.sampled_from(METHODS))
def test_step_gae_property(seed, gamma, lam, hole_rate, as_terminal, method):
  rewards, values, mask, bootstrap, truncated, _, _ = random_gae_inputs(seed, S, hole_rate)
  adv, ret = jit_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, as_terminal, level="step",
                     method=method)
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam, bootstrap, truncated, as_terminal)
  assert_close(adv, want_adv, atol=1e-4)
  assert_close(ret, want_ret, atol=1e-4)
  assert_zero_outside(adv, mask)


@pytest.mark.parametrize("method", METHODS)
def test_step_gae_on_batches_matches_numpy_loop(method):
  for seed in SEEDS:
    batch = random_episode_batch(seed)
    nb = NpBatch(batch, random_values(seed))
    for gamma, lam in ((0.9, 0.8), (1.0, 1.0)):
      for as_terminal in (False, True):
        adv, ret = jit_gae(batch.step_rewards, nb.step_values.astype(np.float32), batch.step_mask, gamma, lam,
                           nb.bootstrap.astype(np.float32), batch.truncated, as_terminal, level="step", method=method)
        want_adv, want_ret = np_gae(batch.step_rewards, nb.step_values, batch.step_mask, gamma, lam, nb.bootstrap,
                                    batch.truncated, as_terminal)
        assert_close(adv, want_adv)
        assert_close(ret, want_ret)


@pytest.mark.parametrize("method", METHODS)
def test_gae_lambda_limits(method):
  """λ=1: advantage = discounted return (+ γ^k bootstrap if truncated) − V; λ=0: the one-step TD error."""
  for seed in SEEDS:
    rewards, values, mask, bootstrap, truncated, gamma, _ = random_gae_inputs(seed, S)
    adv, _ = jit_gae(rewards, values, mask, gamma, 1.0, bootstrap, truncated, False, level="step", method=method)
    tail = np.zeros((B, S))  # γ^(number of valid steps from t to the end) · bootstrap, truncated rows only
    next_values = np.zeros((B, S))
    for b in range(B):
      count, following = 0, (bootstrap[b] if truncated[b] else 0.0)
      for t in reversed(range(S)):
        if mask[b, t]:
          count += 1
          tail[b, t] = gamma**count * (bootstrap[b] if truncated[b] else 0.0)
          next_values[b, t] = following
          following = values[b, t]
    expected = np.where(mask, np_discounted(rewards, mask, gamma) + tail - values, 0.0)
    assert_close(adv, expected, atol=1e-4)
    adv, _ = jit_gae(rewards, values, mask, gamma, 0.0, bootstrap, truncated, False, level="step", method=method)
    assert_close(adv, np.where(mask, rewards + gamma * next_values - values, 0.0))


@pytest.mark.parametrize("method", METHODS)
def test_token_gae_equals_step_gae_for_one_token_steps(method):
  for seed in SEEDS:
    batch = random_episode_batch(seed, max_action=1)
    pv = random_values(seed)
    nb = NpBatch(batch, pv)
    common = (0.95, 0.7, nb.bootstrap.astype(np.float32), batch.truncated, False)
    step_adv, step_ret = jit_gae(batch.step_rewards, nb.step_values.astype(np.float32), batch.step_mask, *common,
                                 level="step", method=method)
    token_adv, token_ret = jit_gae(nb.token_rewards.astype(np.float32), nb.token_values.astype(np.float32),
                                   batch.action_mask, *common, level="token", method=method)
    assert_close(token_adv, nb.broadcast(np.asarray(step_adv, np.float64)))
    assert_close(token_ret, nb.broadcast(np.asarray(step_ret, np.float64)))


def test_gae_accepts_leading_batch_dims_and_bfloat16_values():
  rewards, values, mask, bootstrap, truncated, gamma, lam = random_gae_inputs(0, S)
  run = jax.jit(lambda r, v, m, bv, tr: credit.step_gae(r, v, m, gamma=gamma, lam=lam, bootstrap_values=bv,
                                                        truncated=tr)[0])
  adv = run(rewards.reshape(2, 4, S), jnp.asarray(values.reshape(2, 4, S), jnp.bfloat16), mask.reshape(2, 4, S),
            bootstrap.reshape(2, 4), truncated.reshape(2, 4))
  assert adv.dtype == jnp.float32  # a bfloat16 value head still accumulates in float32
  values_bf16 = np.asarray(jnp.asarray(values, jnp.bfloat16), np.float64)
  want, _ = np_gae(rewards, values_bf16, mask, gamma, lam, bootstrap, truncated, False)
  assert_close(np.asarray(adv).reshape(B, S), want)


# ------------------------------------------------------------------------------------------------------
# group-relative estimators
# ------------------------------------------------------------------------------------------------------


def random_group_inputs(seed):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=B).astype(np.float32)
  group_id = rng.choice(np.array([5, -1, 10**9], np.int32), size=B)  # arbitrary ids, not < B
  valid = rng.random(B) < 0.8
  return scores, group_id, valid


@jax.jit
def jit_groups(scores, group_id, valid):
  return (credit.grpo(scores, group_id, valid), credit.grpo(scores, group_id, valid, normalize_std=False),
          credit.rloo(scores, group_id, valid))


def test_grpo_dr_grpo_rloo_match_numpy():
  for seed in range(10):
    scores, group_id, valid = random_group_inputs(seed)
    grpo, dr_grpo, rloo = jit_groups(scores, group_id, valid)
    assert_close(grpo, np_grpo(scores, group_id, valid), atol=1e-4)
    assert_close(dr_grpo, np_grpo(scores, group_id, valid, normalize_std=False))
    assert_close(rloo, np_rloo(scores, group_id, valid))
    for out in (grpo, dr_grpo, rloo):
      assert_zero_outside(out, valid)
    for members in np_groups(group_id.tolist(), valid).values():
      if len(members) > 1:  # group-relative advantages sum to 0 within every group
        assert abs(float(np.sum(np.asarray(grpo)[members]))) < 1e-4
        assert abs(float(np.sum(np.asarray(dr_grpo)[members]))) < 1e-5
      else:
        assert_close(np.asarray(rloo)[members], scores[members])


def test_grpo_ties_give_exact_zero():
  scores = np.full(B, 0.3, np.float32)
  out = jit_groups(scores, np.zeros(B, np.int32), np.ones(B, bool))
  for advantages in out:
    assert np.all(np.asarray(advantages) == 0.0)


def test_reinforce_pp_and_baseline_match_numpy():
  fn = jax.jit(lambda tr, am, s, g, v: (credit.reinforce_pp(tr, am, gamma=0.97),
                                        credit.reinforce_pp_baseline(s, g, am, v)))
  for seed in SEEDS:
    batch = random_episode_batch(seed, reward_density=0.8)
    nb = NpBatch(batch)
    plus, baseline = fn(nb.token_rewards.astype(np.float32), batch.action_mask, nb.scores.astype(np.float32),
                        batch.group_id, nb.valid_episode)
    want = np_whiten(np_discounted(nb.token_rewards, batch.action_mask, 0.97), batch.action_mask)
    assert_close(plus, want)
    centered = np.zeros(B)
    for members in np_groups(batch.group_id.tolist(), nb.valid_episode).values():
      centered[members] = nb.scores[members] - (nb.scores[members].mean() if len(members) > 1 else 0.0)
    assert_close(baseline, np_whiten(np.where(batch.action_mask, centered[:, None], 0.0), batch.action_mask))
    assert_zero_outside(plus, batch.action_mask)
    assert_zero_outside(baseline, batch.action_mask)


def anchor_batch(seed):
  """Tiny vocabulary and short prompts/observations so that anchor states repeat within groups."""
  return random_episode_batch(seed, vocab_size=3, max_prompt=2, max_obs=2, num_groups=2)


def test_anchor_state_ids_match_python_dict():
  fn = jax.jit(credit.anchor_state_ids)
  shared = 0
  for seed in SEEDS:
    batch = anchor_batch(seed)
    nb = NpBatch(batch)
    ids, count = fn(batch.tokens, batch.step_start, batch.step_len, batch.step_mask, batch.group_id)
    ids = np.asarray(ids)
    anchors = {}
    for b in range(B):
      for t in range(S):
        if batch.step_mask[b, t]:
          anchors.setdefault((int(batch.group_id[b]), nb.observation(b, t)), []).append((b, t))
    assert int(count) == len(anchors)
    assert np.all(ids[~batch.step_mask] == B * S)
    seen = set()
    for members in anchors.values():
      member_ids = {int(ids[b, t]) for b, t in members}
      assert len(member_ids) == 1
      seen |= member_ids
      shared += len(members) > 1
    assert len(seen) == len(anchors)
  assert shared > 5  # the data really exercises shared anchors


@jax.jit
def jit_gigpo_both_modes(batch, omega):
  anchors, _ = credit.anchor_state_ids(batch.tokens, batch.step_start, batch.step_len, batch.step_mask,
                                       batch.group_id)
  scores = jnp.sum(batch.step_rewards, axis=1)
  return tuple(credit.gigpo(scores, batch.step_rewards, batch.step_mask, batch.group_id, anchors, gamma=0.9,
                            omega=omega, mode=mode) for mode in credit.GIGPO_MODES)


def test_gigpo_matches_numpy():
  for seed in SEEDS:
    batch = random_episode_batch(seed, vocab_size=3, max_prompt=2, max_obs=2, num_groups=2, reward_density=1.0)
    nb = NpBatch(batch)
    for mode, out in zip(credit.GIGPO_MODES, jit_gigpo_both_modes(batch, 0.5)):
      assert_close(out, nb.gigpo(0.9, 0.5, mode), atol=1e-4)
      assert_zero_outside(out, batch.step_mask)


# ------------------------------------------------------------------------------------------------------
# registry and compute_advantages
# ------------------------------------------------------------------------------------------------------

CONFIGS = (
    credit.CreditConfig("step_gae", gamma=0.95, lam=0.9, whiten="step"),
    credit.CreditConfig("step_gae", gamma=0.95, lam=0.9, whiten=None, truncation_as_terminal=True),
    credit.CreditConfig("step_gae", gamma=1.0, lam=0.5, whiten="token"),
    credit.CreditConfig("token_gae", gamma=0.99, lam=0.95, whiten="token"),
    credit.CreditConfig("token_gae", gamma=0.99, lam=0.95, whiten=None, truncation_as_terminal=True),
    credit.CreditConfig("grpo", whiten=None),
    credit.CreditConfig("grpo", whiten="step", normalize_std=False),
    credit.CreditConfig("rloo", whiten=None),
    credit.CreditConfig("reinforce_pp", gamma=0.9, whiten=None),
    credit.CreditConfig("reinforce_pp_baseline", whiten=None),  # it whitens itself; whitening again is refused
    credit.CreditConfig("gigpo", gamma=0.9, whiten=None, gigpo_omega=0.7),
    credit.CreditConfig("gigpo", gamma=1.0, whiten="token", gigpo_mode="mean_norm"),
)


def test_compute_advantages_matches_numpy_pipeline():
  for seed in range(4):
    batch = random_episode_batch(seed, vocab_size=4, max_prompt=3, max_obs=2, reward_density=0.9)
    pv = random_values(seed)
    for config, got in zip(CONFIGS, jit_credits(CONFIGS, batch, pv)):
      per_token, per_step, returns = np_credit(config, batch, pv)
      err = f"{config}"
      np.testing.assert_allclose(np.asarray(got.token_advantages), per_token, rtol=RTOL, atol=1e-4, err_msg=err)
      np.testing.assert_allclose(np.asarray(got.step_advantages), per_step, rtol=RTOL, atol=1e-4, err_msg=err)
      assert_zero_outside(got.token_advantages, batch.action_mask)
      assert_zero_outside(got.step_advantages, batch.step_mask)
      critic = credit.critic_level(config.estimator)
      assert (got.returns is None) == (returns is None) == (critic is None)
      if returns is not None:  # value targets at the level the critic is read at
        assert got.returns.shape == {"step": (B, S), "token": (B, L)}[critic]
        np.testing.assert_allclose(np.asarray(got.returns), returns, rtol=RTOL, atol=1e-4, err_msg=err)


def test_registry():
  assert set(credit.ESTIMATORS) == {"step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline",
                                    "gigpo"}
  assert [credit.critic_level(n) for n in ("step_gae", "token_gae", "grpo", "gigpo")] == ["step", "token", None, None]
  assert credit.get_estimator("rloo") is credit.ESTIMATORS["rloo"].fn
  assert hash(credit.CreditConfig()) == hash(credit.CreditConfig())  # usable as a static jit argument
  facts = {name: (spec.critic, spec.level, spec.whitens) for name, spec in credit.ESTIMATORS.items()}
  assert facts == {"step_gae": ("step", "step", False), "token_gae": ("token", "token", False),
                   "grpo": (None, "step", False), "rloo": (None, "step", False), "gigpo": (None, "step", False),
                   "reinforce_pp": (None, "token", True), "reinforce_pp_baseline": (None, "token", True)}
  for name, spec in credit.ESTIMATORS.items():
    assert credit.estimator_spec(name) is spec and spec.name == name and credit.critic_level(name) == spec.critic
  # Every estimator builds with some whitening mode, and exactly the ones its spec allows.
  for name, spec in credit.ESTIMATORS.items():
    allowed = {None} if spec.whitens else ({"token", None} if spec.level == "token" else {"step", "token", None})
    for whiten in credit.WHITEN_MODES:
      if whiten in allowed:
        credit.CreditConfig(name, whiten=whiten)
      else:
        with pytest.raises(ValueError, match="^whiten: "):
          credit.CreditConfig(name, whiten=whiten)


@pytest.fixture
def episode_return_estimator():
  """A toy estimator, registered in one edit (the decorated function) and unregistered after the test."""

  @credit.register_estimator("episode_return", critic=None, level="step")
  def episode_return(config, batch, position_values):
    """The episode's return on every valid step."""
    return jnp.where(batch.step_mask, batch.episode_returns()[:, None], 0.0), None

  try:
    yield episode_return
  finally:
    credit.unregister_estimator("episode_return")


def test_a_new_estimator_is_one_decorated_function(episode_return_estimator):
  spec = credit.estimator_spec("episode_return")
  assert spec == credit.EstimatorSpec("episode_return", episode_return_estimator, critic=None, level="step",
                                      whitens=False)
  assert credit.critic_level("episode_return") is None and "episode_return" in credit.ESTIMATORS
  configs = (credit.CreditConfig("episode_return", whiten=None), credit.CreditConfig("episode_return", whiten="step"),
             credit.CreditConfig("episode_return", whiten="token"))
  for seed in range(2):
    batch = random_episode_batch(seed, reward_density=0.9)
    nb = NpBatch(batch)
    per_step = np.where(batch.step_mask, nb.scores[:, None], 0.0)
    plain, step_whitened, token_whitened = jit_credits(configs, batch, None)  # no critic: no position values
    assert_close(plain.step_advantages, per_step)
    assert_close(plain.token_advantages, nb.broadcast(per_step))
    assert_close(step_whitened.token_advantages, nb.broadcast(np_whiten(per_step, batch.step_mask)), atol=1e-4)
    want_tokens = np_whiten(nb.broadcast(per_step), batch.action_mask)
    assert_close(token_whitened.token_advantages, want_tokens, atol=1e-4)
    assert_close(token_whitened.step_advantages, nb.step_mean(want_tokens), atol=1e-4)
    assert plain.returns is None


def test_registering_and_unregistering_estimators(episode_return_estimator):
  with pytest.raises(ValueError, match=r"^name: estimator 'episode_return' is already registered$"):
    credit.register_estimator("episode_return", critic=None, level="step")
  for kwargs, field in ((dict(critic="head", level="step"), "critic"), (dict(critic=None, level="episode"), "level"),
                        (dict(critic=None, level="step", whitens="yes"), "whitens")):
    with pytest.raises(ValueError, match=f"^{field}: "):
      credit.register_estimator("another", **kwargs)
  assert "another" not in credit.ESTIMATORS
  wrong = credit.register_estimator("wrong_level", critic=None, level="token")(episode_return_estimator)  # [B, S]
  try:
    with pytest.raises(ValueError, match=r"^estimator: expected shape \(8, 96\) \(the shape of 'wrong_level'"):
      credit.compute_advantages(credit.CreditConfig("wrong_level", whiten=None), random_episode_batch(0))
  finally:
    assert credit.unregister_estimator("wrong_level").fn is wrong
  assert "wrong_level" not in credit.ESTIMATORS
  with pytest.raises(ValueError, match="^estimator: unknown 'wrong_level'"):
    credit.unregister_estimator("wrong_level")


# ------------------------------------------------------------------------------------------------------
# jit / vmap
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,level,slots", [("scan", "token", L), ("associative", "step", S)])
def test_vmap_over_gamma_and_lambda(method, level, slots):
  rewards, values, mask, bootstrap, truncated, _, _ = random_gae_inputs(7, slots)
  gammas = jnp.array([0.0, 0.5, 0.99, 1.0])
  lams = jnp.array([1.0, 0.0, 0.95, 0.3])
  gae = credit.token_gae if level == "token" else credit.step_gae

  @jax.jit
  def sweep(gammas, lams):
    one = lambda g, l: gae(rewards, values, mask, gamma=g, lam=l, bootstrap_values=bootstrap, truncated=truncated,
                           method=method)[0]
    return jax.vmap(one)(gammas, lams)

  out = sweep(gammas, lams)
  for i, (g, l) in enumerate(zip(gammas.tolist(), lams.tolist())):
    assert_close(out[i], np_gae(rewards, values, mask, g, l, bootstrap, truncated, False)[0], atol=1e-4)


def test_compute_advantages_with_traced_gamma_under_vmap():
  batch = random_episode_batch(5)
  pv = random_values(5)
  gammas = np.array([0.5, 0.9, 1.0], np.float32)

  @jax.jit
  def sweep(gammas):
    config = lambda g: credit.CreditConfig("step_gae", gamma=g, lam=0.9, whiten="step")
    return jax.vmap(lambda g: credit.compute_advantages(config(g), batch, pv).token_advantages)(gammas)

  out = sweep(gammas)
  for i, gamma in enumerate(gammas.tolist()):
    want = np_credit(credit.CreditConfig("step_gae", gamma=gamma, lam=0.9, whiten="step"), batch, pv)[0]
    assert_close(out[i], want, atol=1e-4)


def test_vmap_over_batches_of_episodes():
  batches = [random_episode_batch(seed) for seed in (11, 12)]
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
  pvs = np.stack([random_values(11), random_values(12)])
  configs = (CONFIGS[0], CONFIGS[9], CONFIGS[11])  # step critic; own whitening + step means; anchors + groups
  vmapped = jax.jit(jax.vmap(lambda b, v: jit_credits(configs, b, v)))(stacked, pvs)
  for i, batch in enumerate(batches):
    for config, got in zip(configs, vmapped):
      want = np_credit(config, batch, pvs[i])[0]
      np.testing.assert_allclose(np.asarray(got.token_advantages[i]), want, rtol=RTOL, atol=1e-4, err_msg=f"{config}")

  @jax.jit
  @jax.vmap
  def grouped(scores, group_id, valid):
    return jit_groups(scores, group_id, valid)

  inputs = [random_group_inputs(seed) for seed in (1, 2)]
  out = grouped(*(np.stack(parts) for parts in zip(*inputs)))
  for i, (scores, group_id, valid) in enumerate(inputs):
    assert_close(out[0][i], np_grpo(scores, group_id, valid), atol=1e-4)
    assert_close(out[2][i], np_rloo(scores, group_id, valid))


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------

_R = np.zeros((B, S), np.float32)
_M = np.ones((B, S), bool)
_BATCH = random_episode_batch(0)

BAD_INPUTS = [
    ("values", lambda: credit.step_gae(_R, np.zeros((B, S + 1), np.float32), _M, gamma=1.0, lam=1.0)),
    ("mask", lambda: credit.step_gae(_R, _R, _M.astype(np.float32), gamma=1.0, lam=1.0)),
    ("action_mask", lambda: credit.token_gae(_R, _R, _M[:, :-1], gamma=1.0, lam=1.0)),
    ("rewards", lambda: credit.step_gae(_R.astype(np.int32), _R, _M, gamma=1.0, lam=1.0)),
    ("gamma", lambda: credit.step_gae(_R, _R, _M, gamma=1.5, lam=1.0)),
    ("gamma", lambda: credit.step_gae(_R, _R, _M, gamma=np.ones(2), lam=1.0)),
    ("lam", lambda: credit.step_gae(_R, _R, _M, gamma=1.0, lam=-0.1)),
    ("bootstrap_values", lambda: credit.step_gae(_R, _R, _M, gamma=1.0, lam=1.0, bootstrap_values=np.zeros(B + 1))),
    ("truncated", lambda: credit.step_gae(_R, _R, _M, gamma=1.0, lam=1.0, truncated=np.zeros(B, np.int32))),
    ("method", lambda: credit.step_gae(_R, _R, _M, gamma=1.0, lam=1.0, method="cumsum")),
    ("group_id", lambda: credit.grpo(_R[:, 0], _R[:, 0])),
    ("group_id", lambda: credit.rloo(_R[:, 0], np.zeros(B + 1, np.int32))),
    ("mode", lambda: credit.gigpo(_R[:, 0], _R, _M, np.zeros(B, np.int32), np.zeros((B, S), np.int32), gamma=1.0,
                                  mode="z_score")),
    ("estimator", lambda: credit.CreditConfig(estimator="ppo")),
    ("estimator", lambda: credit.get_estimator("dr_grpo")),
    ("estimator", lambda: credit.critic_level("nope")),
    ("estimator", lambda: credit.estimator_spec(None)),
    ("whiten", lambda: credit.CreditConfig(whiten="batch")),
    ("whiten", lambda: credit.CreditConfig(estimator="token_gae", whiten="step")),
    ("whiten", lambda: credit.CreditConfig(estimator="reinforce_pp", whiten="token")),  # it whitens itself
    ("whiten", lambda: credit.CreditConfig(estimator="reinforce_pp_baseline", whiten="token")),
    ("whiten", lambda: credit.CreditConfig(estimator="reinforce_pp", whiten="step")),
    ("gae_unroll", lambda: credit.CreditConfig(gae_unroll=0)),
    ("unroll", lambda: credit.step_gae(_R, _R, _M, gamma=1.0, lam=1.0, unroll=True)),
    ("gigpo_mode", lambda: credit.CreditConfig(gigpo_mode="std")),
    ("gamma", lambda: credit.CreditConfig(gamma=2.0)),
    ("lam", lambda: credit.CreditConfig(lam=-1)),
    ("position_values", lambda: credit.compute_advantages(credit.CreditConfig(), _BATCH)),
    ("position_values", lambda: credit.compute_advantages(credit.CreditConfig(), _BATCH, np.zeros((B, L + 1)))),
    ("values", lambda: jax.jit(lambda r, v: credit.step_gae(r, v, _M, gamma=1.0, lam=1.0))(_R, _R[:, :3])),
]


@pytest.mark.parametrize("arg,call", BAD_INPUTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_naming_the_argument(arg, call):
  with pytest.raises(ValueError, match="^" + re.escape(arg) + ": ") as info:
    call()
  assert "\n" not in str(info.value)


def test_bad_names_list_what_is_allowed():
  with pytest.raises(ValueError) as info:
    credit.CreditConfig(estimator="dr_grpo")
  assert str(info.value) == ("estimator: unknown 'dr_grpo'; allowed: step_gae, token_gae, grpo, rloo, reinforce_pp, "
                             "reinforce_pp_baseline, gigpo (Dr.GRPO is 'grpo' with normalize_std=False)")
  with pytest.raises(ValueError, match=r"^whiten: 'reinforce_pp' already whitens its advantages"):
    credit.CreditConfig(estimator="reinforce_pp", whiten="token")
  with pytest.raises(ValueError, match=r"^whiten: unknown 'batch'; allowed: step, token, None$"):
    credit.CreditConfig(whiten="batch")
