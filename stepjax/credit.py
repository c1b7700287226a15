"""Advantage estimators and the registry that picks one by name: pure functions over fixed-shape arrays.

Every function here is jit- and vmap-compatible (no Python loops over time, no data-dependent shapes) and checks
its inputs at trace time: a wrong shape, dtype or hyperparameter raises one ValueError line naming the argument.

Conventions (B episodes, S step slots, L tokens):

* Critic estimators — `step_gae` (one value per step, StepPO) and `token_gae` (one value per action token, PPO
  for LLMs) — share one reverse recursion over slots. Masked slots neither advance it nor discount, so holes in a
  mask (observation tokens, padding) never leak into the advantages.
* After an episode's last valid slot the next value is `bootstrap_values` for truncated episodes and 0 for
  terminated ones (and for episodes that are neither); `truncation_as_terminal=True` reproduces the reference
  implementation, which treats truncation as terminal.
* Critic-free estimators — `grpo` (with `normalize_std=False`: Dr.GRPO), `rloo`, `reinforce_pp`,
  `reinforce_pp_baseline`, `gigpo` — compare episodes (or steps) within groups keyed by arbitrary int ids.
  Invalid items give exactly 0 and never count in a group statistic.
* Each estimator is registered once with `@register_estimator(name, critic=..., level=..., whitens=...)`;
  `compute_advantages(config, batch, position_values)` runs the one `config.estimator` names, whitens ("step" or
  "token") and returns a `Credit` with the per-token advantages the policy loss consumes.

Whitening, step means and broadcasts, and group ids live in `stepjax.segments`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import struct
from jax import lax

from stepjax.checks import check_array, check_bool, check_choice, check_hyper, check_int, fail
# broadcast_to_tokens, masked_whiten and segment_ids live in segments; they stay importable from here.
from stepjax.segments import (broadcast_to_tokens, compute_dtype, group_moments, masked_whiten, mean_per_step,
                               segment_ids)
from stepjax.types import EpisodeBatch

Array = Any

GAE_METHODS = ("scan", "associative")
# benchmarks/credit.py: on CPU a plain reverse lax.scan (unroll=1) beats associative_scan and larger unrolls.
DEFAULT_GAE_METHOD = "scan"
DEFAULT_GAE_UNROLL = 1
WHITEN_MODES = ("step", "token", None)
GIGPO_MODES = ("mean_std_norm", "mean_norm")
CRITIC_LEVELS = ("step", "token", None)
ADVANTAGE_LEVELS = ("step", "token")

# Odd multipliers are invertible mod 2**32, which lets a span hash be read off two prefix hashes.
_HASH_MULTIPLIERS = (0x9E3779B1, 0x01000193)

# Credit's inputs may be anything jnp.asarray takes (lists, numpy arrays); checked, then converted.
_as_array = functools.partial(check_array, convert=True)


def _check_rate(x, field: str) -> None:
  """gamma / lam: a scalar in [0, 1], range-checked only when concrete (it may be traced under vmap)."""
  check_hyper(x, field, lambda v: (v >= 0) & (v <= 1), "a number in [0, 1]", scalar=True)


# ------------------------------------------------------------------------------------------------------
# GAE: one reverse recursion over slots, two implementations.
# ------------------------------------------------------------------------------------------------------


def _gae_scan(rewards, values, valid, next_after_last, discount, decay, unroll):
  """Reverse lax.scan over the last axis. All [..., T] except next_after_last [...]."""

  def backward(carry, slot):
    next_value, next_advantage = carry
    reward, value, ok = slot
    advantage = reward + discount * next_value - value + decay * next_advantage
    # A masked slot hands (V_next, A_next) through untouched: it neither advances nor discounts.
    carry = (jnp.where(ok, value, next_value), jnp.where(ok, advantage, next_advantage))
    return carry, jnp.where(ok, advantage, 0.0)

  time_major = [jnp.moveaxis(x, -1, 0) for x in (rewards, values, valid)]
  init = (next_after_last, jnp.zeros_like(next_after_last))
  _, advantages = lax.scan(backward, init, time_major, reverse=True, unroll=unroll)
  return jnp.moveaxis(advantages, 0, -1)


def _compose_affine(inner, outer):
  """(c, d) stands for x -> d + c·x. Returns outer ∘ inner (`inner` holds the later slots of a reverse scan)."""
  c_inner, d_inner = inner
  c_outer, d_outer = outer
  return c_outer * c_inner, d_outer + c_outer * d_inner


def _gae_associative(rewards, values, valid, next_after_last, discount, decay):
  """Same recursion in O(log T) depth: a segmented "next valid value" gather, then an affine associative scan."""
  length = rewards.shape[-1]
  axis = rewards.ndim - 1
  slot = jnp.arange(length, dtype=jnp.int32)
  # First valid slot at or after t (a reverse cummin, itself a parallel prefix reduction); `length` means "none",
  # which indexes the bootstrap column.
  first_valid_from = lax.cummin(jnp.where(valid, slot, length), axis=axis, reverse=True)
  none_left = jnp.full(first_valid_from.shape[:-1] + (1,), length, jnp.int32)
  next_valid = jnp.concatenate([first_valid_from[..., 1:], none_left], axis=-1)
  values_then_bootstrap = jnp.concatenate([values, next_after_last[..., None]], axis=-1)
  next_value = jnp.take_along_axis(values_then_bootstrap, next_valid, axis=-1)
  delta = jnp.where(valid, rewards + discount * next_value - values, 0.0)
  # A_t = δ_t + c_t·A_{t+1}; masked slots are the identity map (c = 1, δ = 0).
  coefficient = jnp.where(valid, decay, jnp.ones((), rewards.dtype))
  _, advantages = lax.associative_scan(_compose_affine, (coefficient, delta), reverse=True, axis=axis)
  return jnp.where(valid, advantages, 0.0)


def _gae(rewards, values, mask, mask_name, *, gamma, lam, bootstrap_values, truncated, truncation_as_terminal,
         method, unroll):
  """Shared body of step_gae and token_gae: checks, then the chosen recursion. Returns (advantages, returns)."""
  check_choice(method, "method", GAE_METHODS)
  check_int(unroll, "unroll", minimum=1)
  _check_rate(gamma, "gamma")
  _check_rate(lam, "lam")
  rewards = _as_array(rewards, "rewards", "float")
  if rewards.ndim < 1:
    fail("rewards", "expected an array with a slot axis [..., T], got a scalar")
  values = _as_array(values, "values", "float", shape=rewards.shape, like="rewards")
  mask = _as_array(mask, mask_name, "bool", shape=rewards.shape, like="rewards")
  episode_shape = rewards.shape[:-1]
  if bootstrap_values is None:
    bootstrap_values = jnp.zeros(episode_shape, values.dtype)
  bootstrap_values = _as_array(bootstrap_values, "bootstrap_values", "float", shape=episode_shape,
                               like="rewards without its last axis")
  truncated = jnp.zeros(episode_shape, bool) if truncated is None else truncated
  truncated = _as_array(truncated, "truncated", "bool", shape=episode_shape, like="rewards without its last axis")
  truncation_as_terminal = _as_array(truncation_as_terminal, "truncation_as_terminal", "bool", shape=())

  dtype = compute_dtype(rewards, values, bootstrap_values)
  rewards, values, bootstrap_values = (x.astype(dtype) for x in (rewards, values, bootstrap_values))
  discount = jnp.asarray(gamma, dtype)
  decay = discount * jnp.asarray(lam, dtype)
  # Only a truncated episode bootstraps; terminated ones (and ones that are neither) end with V = 0.
  bootstraps = truncated & jnp.logical_not(truncation_as_terminal)
  next_after_last = jnp.where(bootstraps, bootstrap_values, 0.0)
  if rewards.shape[-1] == 0:
    advantages = jnp.zeros_like(rewards)
  elif method == "scan":
    advantages = _gae_scan(rewards, values, mask, next_after_last, discount, decay, unroll)
  else:
    advantages = _gae_associative(rewards, values, mask, next_after_last, discount, decay)
  returns = jnp.where(mask, advantages + values, 0.0)
  return advantages, returns


def step_gae(rewards, values, mask, *, gamma, lam, bootstrap_values=None, truncated=None,
             truncation_as_terminal=False, method: str = DEFAULT_GAE_METHOD, unroll: int = DEFAULT_GAE_UNROLL):
  """Step-level GAE (StepPO): δ_t = r_t + γ·V(s_{t+1}) − V(s_t), A_t = δ_t + γλ·A_{t+1}, reversed over steps.

  Args:
    rewards: [B, S] float, reward of each step (any leading batch dims: [..., S]).
    values: [B, S] float, V(s_t) (e.g. `batch.step_values(position_values)`).
    mask: [B, S] bool, valid steps. Holes are allowed: a masked slot neither advances the recursion nor
      discounts, outputs exactly 0 and hands (V_next, A_next) through unchanged.
    gamma, lam: scalars in [0, 1] (range-checked when concrete; may be traced, e.g. under vmap).
    bootstrap_values: [B] float, V of the state after the last step (`batch.bootstrap_values(...)`); default 0.
    truncated: [B] bool; after the last valid step V_next = bootstrap_values if truncated (and not
      truncation_as_terminal), else 0. Default all False.
    truncation_as_terminal: bool, treat truncation as terminal (the reference implementation's behaviour).
    method: "scan" (reverse lax.scan) or "associative" (lax.associative_scan, O(log S) depth).
    unroll: lax.scan unroll factor (method="scan" only).

  Returns:
    (advantages [B, S], returns [B, S]): returns = advantages + values on valid steps; both 0 elsewhere.
  """
  return _gae(rewards, values, mask, "mask", gamma=gamma, lam=lam, bootstrap_values=bootstrap_values,
              truncated=truncated, truncation_as_terminal=truncation_as_terminal, method=method, unroll=unroll)


def token_gae(rewards, values, action_mask, *, gamma, lam, bootstrap_values=None, truncated=None,
              truncation_as_terminal=False, method: str = DEFAULT_GAE_METHOD, unroll: int = DEFAULT_GAE_UNROLL):
  """Token-level GAE over a packed row: the recursion of `step_gae` with one slot per token.

  Prompt, observation and pad tokens (action_mask False) neither advance the recursion nor discount, so the
  recursion carries across steps: the last action token of a step bootstraps from the value at the next step's
  first action token, and γ counts action tokens only.

  Args:
    rewards: [B, L] float (e.g. `batch.token_rewards()`: the step reward on the step's last action token).
    values: [B, L] float, the value before each action token (`batch.token_values(position_values)`).
    action_mask: [B, L] bool.
    gamma, lam, bootstrap_values [B], truncated [B], truncation_as_terminal, method, unroll: as in `step_gae`.

  Returns:
    (advantages [B, L], returns [B, L]), 0 off action tokens.
  """
  return _gae(rewards, values, action_mask, "action_mask", gamma=gamma, lam=lam, bootstrap_values=bootstrap_values,
              truncated=truncated, truncation_as_terminal=truncation_as_terminal, method=method, unroll=unroll)


def discounted_returns(rewards, mask, *, gamma, method: str = DEFAULT_GAE_METHOD):
  """G_t = Σ_{k ≥ t, mask_k} γ^{(#valid slots in [t, k))} r_k over valid slots, terminal at the end: [..., T].

  Masked slots output 0 and do not discount (GAE with V = 0 and λ = 1).
  """
  rewards = _as_array(rewards, "rewards", "float")
  advantages, _ = _gae(rewards, jnp.zeros_like(rewards), mask, "mask", gamma=gamma, lam=1.0, bootstrap_values=None,
                       truncated=None, truncation_as_terminal=True, method=method, unroll=DEFAULT_GAE_UNROLL)
  return advantages


# ------------------------------------------------------------------------------------------------------
# Group-relative estimators (groups keyed by arbitrary int ids: `segments.segment_ids`).
# ------------------------------------------------------------------------------------------------------


def _episode_inputs(scores, group_id, valid):
  scores = _as_array(scores, "scores", "float", rank=1, dims="[B]")
  group_id = _as_array(group_id, "group_id", "int", shape=scores.shape, like="scores")
  valid = jnp.ones(scores.shape, bool) if valid is None else _as_array(valid, "valid", "bool", shape=scores.shape,
                                                                       like="scores")
  return scores.astype(compute_dtype(scores)), group_id, valid


def grpo(scores, group_id, valid=None, *, normalize_std=True, eps: float = 1e-6):
  """GRPO: (R − group mean) / (group std + eps), std unbiased (torch.std). [B] -> [B].

  A group of one gets mean 0 and std 1 (as the reference implementation), so its advantage is R / (1 + eps).
  normalize_std=False is Dr.GRPO: R − group mean, no division. Invalid episodes give 0 and are not counted.
  """
  scores, group_id, valid = _episode_inputs(scores, group_id, valid)
  ids, _ = segment_ids(group_id, valid=valid)
  moments = group_moments(scores, ids, valid)
  alone = moments.size <= 1
  mean = jnp.where(alone, 0.0, moments.mean)
  std = jnp.where(alone, 1.0, moments.std)
  centered = scores - mean
  advantages = jnp.where(normalize_std, centered / (std + eps), centered)
  return jnp.where(valid, advantages, 0.0)


def rloo(scores, group_id, valid=None):
  """RLOO: R − mean of the *other* members of the group = (R − mean)·n/(n − 1). [B] -> [B].

  A group of one has no other member, so it gets no baseline: its advantage is R (as the reference
  implementation). Invalid episodes give 0 and are not counted.
  """
  scores, group_id, valid = _episode_inputs(scores, group_id, valid)
  ids, _ = segment_ids(group_id, valid=valid)
  moments = group_moments(scores, ids, valid)
  size = moments.size
  leave_one_out = (scores - moments.mean) * size / jnp.maximum(size - 1.0, 1.0)
  return jnp.where(valid, jnp.where(size > 1, leave_one_out, scores), 0.0)


def reinforce_pp(token_rewards, action_mask, *, gamma, eps: float = 1e-8, method: str = DEFAULT_GAE_METHOD):
  """REINFORCE++: discounted return over action tokens, whitened over all action tokens. [B, L] -> [B, L].

  The return is token_gae with V = 0 and λ = 1, treated as terminal (so only action tokens discount).
  """
  token_rewards = _as_array(token_rewards, "token_rewards", "float")
  action_mask = _as_array(action_mask, "action_mask", "bool", shape=token_rewards.shape, like="token_rewards")
  returns = discounted_returns(token_rewards, action_mask, gamma=gamma, method=method)
  return masked_whiten(returns, action_mask, eps=eps)


def reinforce_pp_baseline(scores, group_id, action_mask, valid=None, *, eps: float = 1e-8):
  """REINFORCE++-baseline: R − group mean, broadcast to action tokens, whitened over action tokens.

  scores [B], group_id [B], action_mask [B, L], valid [B] -> [B, L]. A group of one gets mean 0 (as the
  reference implementation). Invalid episodes give 0, count in no group mean and in no whitening statistic.
  """
  scores, group_id, valid = _episode_inputs(scores, group_id, valid)
  action_mask = _as_array(action_mask, "action_mask", "bool")
  if action_mask.ndim != 2 or action_mask.shape[0] != scores.shape[0]:
    fail("action_mask", f"expected shape ({scores.shape[0]}, L) (one row per score), got {tuple(action_mask.shape)}")
  ids, _ = segment_ids(group_id, valid=valid)
  moments = group_moments(scores, ids, valid)
  centered = scores - jnp.where(moments.size <= 1, 0.0, moments.mean)
  token_mask = action_mask & valid[:, None]
  per_token = jnp.where(token_mask, centered[:, None], 0.0)
  return masked_whiten(per_token, token_mask, eps=eps)


def _normalize_in_groups(x, ids, valid, mode: str, eps: float):
  """GiGPO normalisation of x [N] within groups: mean_std_norm (x−mean)/(std+eps) or mean_norm x−mean."""
  moments = group_moments(x, ids, valid)
  centered = x - moments.mean  # exactly 0 for a group of one
  out = centered / (moments.std + eps) if mode == "mean_std_norm" else centered
  return jnp.where(valid, out, 0.0)


def _span_hash(tokens, begin, end, multiplier: int):
  """Σ_{i ∈ [begin, end)} tokens[i]·m^(i−begin) mod 2^32, from prefix hashes. tokens [B, L]; begin, end [B, S]."""
  length = tokens.shape[-1]
  inverse = pow(multiplier, -1, 1 << 32)
  ones = jnp.ones((1,), jnp.uint32)
  powers = jnp.concatenate([ones, lax.cumprod(jnp.full((length,), multiplier, jnp.uint32))])  # m^0..m^L
  inverse_powers = jnp.concatenate([ones, lax.cumprod(jnp.full((length,), inverse, jnp.uint32))])
  symbols = lax.bitcast_convert_type(tokens.astype(jnp.int32), jnp.uint32)
  prefix = lax.cumsum(symbols * powers[:length], axis=tokens.ndim - 1)  # uint32 arithmetic wraps mod 2^32
  prefix = jnp.concatenate([jnp.zeros(prefix.shape[:-1] + (1,), jnp.uint32), prefix], axis=-1)  # [B, L + 1]
  span = jnp.take_along_axis(prefix, end, axis=-1) - jnp.take_along_axis(prefix, begin, axis=-1)
  return span * inverse_powers[begin]


def preceding_observation_keys(tokens, step_start, step_len):
  """Hash keys of each step's preceding observation: (hash_a, hash_b) uint32 [B, S] and length int32 [B, S].

  The preceding observation of step t is tokens[end of step t−1's action : step_start[t]] (from position 0 for
  t = 0, i.e. the prompt). Two independent polynomial hashes plus the length make accidental collisions
  negligible (about 2^-64 per pair); they are not meant to resist adversarially constructed token sequences.
  """
  tokens = _as_array(tokens, "tokens", "int", rank=2, dims="[B, L]")
  step_start = _as_array(step_start, "step_start", "int")
  if step_start.ndim != 2 or step_start.shape[0] != tokens.shape[0]:
    fail("step_start", f"expected shape ({tokens.shape[0]}, S), got {tuple(step_start.shape)}")
  step_len = _as_array(step_len, "step_len", "int", shape=step_start.shape, like="step_start")
  length = tokens.shape[1]
  step_start = step_start.astype(jnp.int32)
  action_end = step_start + step_len.astype(jnp.int32)
  begin = jnp.concatenate([jnp.zeros_like(action_end[:, :1]), action_end[:, :-1]], axis=1)
  end = jnp.clip(step_start, 0, length)
  begin = jnp.clip(jnp.minimum(begin, end), 0, length)  # invalid slots: an empty span, masked by the caller
  hashes = tuple(_span_hash(tokens, begin, end, m) for m in _HASH_MULTIPLIERS)
  return hashes + (end - begin,)


def anchor_state_ids(tokens, step_start, step_len, step_mask, group_id):
  """GiGPO anchor groups: valid steps of the same group whose preceding observations are identical.

  tokens [B, L], step_start/step_len/step_mask [B, S], group_id [B] -> (ids [B, S] int32, count [] int32);
  dense ids 0..count−1 on valid steps, B·S on invalid ones.
  """
  keys = preceding_observation_keys(tokens, step_start, step_len)
  step_mask = _as_array(step_mask, "step_mask", "bool", shape=keys[0].shape, like="step_start")
  group_id = _as_array(group_id, "group_id", "int", shape=keys[0].shape[:1], like="tokens' batch axis")
  group_per_step = jnp.broadcast_to(group_id[:, None], keys[0].shape)
  flat = [k.reshape(-1) for k in (group_per_step,) + keys]
  ids, count = segment_ids(*flat, valid=step_mask.reshape(-1))
  return ids.reshape(step_mask.shape), count


def gigpo(episode_scores, step_rewards, step_mask, group_id, anchor_ids, *, gamma, omega=1.0,
          mode: str = "mean_std_norm", eps: float = 1e-6):
  """GiGPO: A = A^E + ω·A^S per valid step, 0 elsewhere. Returns [B, S].

  A^E normalises each episode's score within its group_id group (over episodes with at least one valid step).
  A^S normalises each step's discounted step return G_t = Σ_{k≥t} γ^{k−t} r_k within anchor-state groups:
  valid steps with the same group_id and the same anchor_ids (e.g. from `anchor_state_ids`). Both parts use
  `mode`: "mean_std_norm" (x − mean)/(std + eps) with the unbiased std, or "mean_norm" x − mean; a group of one
  gives 0 in both modes.

  Args:
    episode_scores: [B] float (e.g. `batch.episode_returns()`).
    step_rewards: [B, S] float.  step_mask: [B, S] bool (valid steps).  group_id: [B] int.
    anchor_ids: [B, S] int, any ids that are equal exactly for equal anchor states (within a group).
  """
  check_choice(mode, "mode", GIGPO_MODES)
  step_rewards = _as_array(step_rewards, "step_rewards", "float", rank=2, dims="[B, S]")
  step_mask = _as_array(step_mask, "step_mask", "bool", shape=step_rewards.shape, like="step_rewards")
  anchor_ids = _as_array(anchor_ids, "anchor_ids", "int", shape=step_rewards.shape, like="step_rewards")
  per_episode = dict(shape=step_rewards.shape[:1], like="step_rewards' batch axis")
  episode_scores = _as_array(episode_scores, "episode_scores", "float", **per_episode)
  group_id = _as_array(group_id, "group_id", "int", **per_episode)
  dtype = compute_dtype(episode_scores, step_rewards)
  episode_valid = jnp.any(step_mask, axis=1)
  episode_groups, _ = segment_ids(group_id, valid=episode_valid)
  episode_part = _normalize_in_groups(episode_scores.astype(dtype), episode_groups, episode_valid, mode, eps)
  step_returns = discounted_returns(step_rewards.astype(dtype), step_mask, gamma=gamma)
  group_per_step = jnp.broadcast_to(group_id[:, None], step_mask.shape).reshape(-1)
  anchor_groups, _ = segment_ids(group_per_step, anchor_ids.reshape(-1), valid=step_mask.reshape(-1))
  step_part = _normalize_in_groups(step_returns.reshape(-1), anchor_groups, step_mask.reshape(-1), mode, eps)
  combined = episode_part[:, None] + omega * step_part.reshape(step_mask.shape)
  return jnp.where(step_mask, combined, 0.0)


# ------------------------------------------------------------------------------------------------------
# Registry: every estimator registers itself with what it needs and what it returns.
# ------------------------------------------------------------------------------------------------------

EstimatorFn = Callable[["CreditConfig", EpisodeBatch, Any], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
  """A registered estimator: `fn(config, batch, position_values) -> (advantages, returns)`.

  critic: the level the value head is read at: "step" (at step_start - 1, one value per step), "token" (before each
    action token) or None (critic-free: fn ignores position_values and returns None as `returns`).
  level: what fn's advantages are: "step" -> [B, S] per step (0 on invalid steps), "token" -> [B, L] per action
    token (0 elsewhere). returns: the value targets at the critic's level ([B, S] or [B, L]), or None.
  whitens: fn normalises its advantages itself, so CreditConfig.whiten must be None (no double whitening).
  """

  name: str
  fn: EstimatorFn
  critic: str | None
  level: str
  whitens: bool = False


ESTIMATORS: dict[str, EstimatorSpec] = {}  # name -> spec, in registration order; read it, register to extend it


def register_estimator(name: str, *, critic: str | None, level: str, whitens: bool = False):
  """Decorator: registers `fn(config, batch, position_values) -> (advantages, returns)` under `name` (see
  `EstimatorSpec`) and returns fn unchanged. A name is registered once (`unregister_estimator` frees it)."""
  if not isinstance(name, str) or not name:
    fail("name", f"expected a non-empty str, got {name!r}")
  if name in ESTIMATORS:
    fail("name", f"estimator {name!r} is already registered")
  check_choice(critic, "critic", CRITIC_LEVELS)
  check_choice(level, "level", ADVANTAGE_LEVELS)
  check_bool(whitens, "whitens")

  def register(fn: EstimatorFn) -> EstimatorFn:
    ESTIMATORS[name] = EstimatorSpec(name=name, fn=fn, critic=critic, level=level, whitens=bool(whitens))
    return fn

  return register


def unregister_estimator(name: str) -> EstimatorSpec:
  """Removes a registered estimator (tests register toy ones) and returns its spec."""
  return ESTIMATORS.pop(estimator_spec(name).name)


def estimator_spec(name: str) -> EstimatorSpec:
  """The registered spec of `name`; ValueError `estimator: ...` naming the allowed names."""
  check_choice(name, "estimator", tuple(ESTIMATORS), hint=" (Dr.GRPO is 'grpo' with normalize_std=False)")
  return ESTIMATORS[name]


def get_estimator(name: str) -> EstimatorFn:
  """The registered estimator `fn(config, batch, position_values) -> (advantages, returns)`."""
  return estimator_spec(name).fn


def critic_level(name: str) -> str | None:
  """Where the estimator reads the value head: "step", "token", or None for critic-free estimators."""
  return estimator_spec(name).critic


@dataclasses.dataclass(frozen=True)
class CreditConfig:
  """Which advantage estimator and how. Validated on construction (and by dataclasses.replace).

  estimator: a name in ESTIMATORS. gamma, lam: in [0, 1] (gamma discounts steps for step-level estimators,
    action tokens for token-level ones). whiten: "step" whitens per-step advantages over valid steps (a long
    step counts as much as a short one) then broadcasts; "token" whitens per-token advantages over action
    tokens; None leaves them. "step" needs a step-level estimator (not token_gae). Estimators that whiten
    themselves (reinforce_pp, reinforce_pp_baseline) need None. Whitening applies to every other estimator: set
    whiten=None to keep GRPO / RLOO / GiGPO advantages exactly as their group normalisation leaves them.
  normalize_std: GRPO divides by the group std (False = Dr.GRPO). gigpo_omega, gigpo_mode: GiGPO's step weight
    and normalisation. group_eps: eps of group normalisations; whiten_eps: eps of whitening (also of the
    estimators that whiten themselves).
  gae_method / gae_unroll: implementation of the GAE recursion ("scan" | "associative").
  """

  estimator: str = "step_gae"
  gamma: float = 1.0
  lam: float = 1.0
  whiten: str | None = "step"
  truncation_as_terminal: bool = False
  normalize_std: bool = True
  gigpo_omega: float = 1.0
  gigpo_mode: str = "mean_std_norm"
  group_eps: float = 1e-6
  whiten_eps: float = 1e-8
  gae_method: str = DEFAULT_GAE_METHOD
  gae_unroll: int = DEFAULT_GAE_UNROLL

  def __post_init__(self):
    spec = estimator_spec(self.estimator)
    check_choice(self.whiten, "whiten", WHITEN_MODES)
    check_choice(self.gigpo_mode, "gigpo_mode", GIGPO_MODES)
    check_choice(self.gae_method, "gae_method", GAE_METHODS)
    check_int(self.gae_unroll, "gae_unroll", minimum=1)
    _check_rate(self.gamma, "gamma")
    _check_rate(self.lam, "lam")
    if spec.whitens and self.whiten is not None:
      fail("whiten", f"{self.estimator!r} already whitens its advantages over action tokens; use None (whitening "
           "twice would only rescale by ~1 and hide the double counting)")
    if self.whiten == "step" and spec.level == "token":
      fail("whiten", f"'step' needs per-step advantages but {self.estimator!r} gives per-token ones; use 'token' "
           "or None")


@struct.dataclass
class Credit:
  """What an estimator hands the losses.

  token_advantages: [B, L] per action token (0 elsewhere): what the policy loss consumes.
  step_advantages: [B, S] per valid step (0 elsewhere); for token-level estimators (and token whitening) the mean
    over the step's tokens. The learner reads it for per-step-index advantage statistics.
  returns: value targets before whitening: [B, S] for a step critic, [B, L] for a token critic, None without one.
  """

  token_advantages: Array
  step_advantages: Array
  returns: Array | None = None


# ------------------------------------------------------------------------------------------------------
# The registered estimators: adding one is one decorated function here.
# ------------------------------------------------------------------------------------------------------


def _episode_valid(batch: EpisodeBatch):
  """Episodes without a valid step have no tokens to credit and stay out of group statistics."""
  return jnp.any(batch.step_mask, axis=1)


def _per_step(batch: EpisodeBatch, per_episode):
  return jnp.where(batch.step_mask, per_episode[:, None], 0.0)


def _gae_options(config: CreditConfig, batch: EpisodeBatch, position_values) -> dict:
  return dict(gamma=config.gamma, lam=config.lam, bootstrap_values=batch.bootstrap_values(position_values),
              truncated=batch.truncated, truncation_as_terminal=config.truncation_as_terminal,
              method=config.gae_method, unroll=config.gae_unroll)


@register_estimator("step_gae", critic="step", level="step")
def _step_gae_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return step_gae(batch.step_rewards, batch.step_values(position_values), batch.step_mask,
                  **_gae_options(config, batch, position_values))


@register_estimator("token_gae", critic="token", level="token")
def _token_gae_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return token_gae(batch.token_rewards(), batch.token_values(position_values), batch.action_mask,
                   **_gae_options(config, batch, position_values))


@register_estimator("grpo", critic=None, level="step")
def _grpo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return _per_step(batch, grpo(batch.episode_returns(), batch.group_id, _episode_valid(batch),
                              normalize_std=config.normalize_std, eps=config.group_eps)), None


@register_estimator("rloo", critic=None, level="step")
def _rloo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return _per_step(batch, rloo(batch.episode_returns(), batch.group_id, _episode_valid(batch))), None


@register_estimator("reinforce_pp", critic=None, level="token", whitens=True)
def _reinforce_pp_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return reinforce_pp(batch.token_rewards(), batch.action_mask, gamma=config.gamma, eps=config.whiten_eps,
                      method=config.gae_method), None


@register_estimator("reinforce_pp_baseline", critic=None, level="token", whitens=True)
def _reinforce_pp_baseline_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  return reinforce_pp_baseline(batch.episode_returns(), batch.group_id, batch.action_mask, _episode_valid(batch),
                               eps=config.whiten_eps), None


@register_estimator("gigpo", critic=None, level="step")
def _gigpo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values):
  anchors, _ = anchor_state_ids(batch.tokens, batch.step_start, batch.step_len, batch.step_mask, batch.group_id)
  return gigpo(batch.episode_returns(), batch.step_rewards, batch.step_mask, batch.group_id, anchors,
               gamma=config.gamma, omega=config.gigpo_omega, mode=config.gigpo_mode, eps=config.group_eps), None


def compute_advantages(config: CreditConfig, batch: EpisodeBatch, position_values=None) -> Credit:
  """Runs `config.estimator` on a batch, whitens per `config.whiten` and returns a `Credit`.

  Args:
    config: a CreditConfig (hashable: pass it as a static argument of jax.jit).
    batch: an EpisodeBatch [B, L] with S step slots.
    position_values: [B, L] float, a value head's output at every position; required by estimators that read a
      critic (step_gae, token_gae), ignored by critic-free ones.
  """
  if not isinstance(config, CreditConfig):
    fail("config", f"expected a CreditConfig, got {type(config).__name__}")
  batch.validate()
  spec = estimator_spec(config.estimator)
  if spec.critic is not None and position_values is None:
    fail("position_values", f"{config.estimator!r} needs a critic: pass the value head's [B, L] output")
  if spec.critic is not None:
    position_values = _as_array(position_values, "position_values", "float", shape=batch.tokens.shape,
                                like="batch.tokens")
  advantages, returns = spec.fn(config, batch, position_values)
  _check_estimate(spec, batch, advantages, returns)
  whiten = functools.partial(masked_whiten, eps=config.whiten_eps)
  if spec.level == "step":
    per_step = whiten(advantages, batch.step_mask) if config.whiten == "step" else advantages
    per_token = broadcast_to_tokens(per_step, batch.step_ids)
    if config.whiten != "token":
      return Credit(token_advantages=per_token, step_advantages=per_step, returns=returns)
  else:
    per_token = advantages
  if config.whiten == "token":
    per_token = whiten(per_token, batch.action_mask)
  per_step = mean_per_step(per_token, batch.step_ids, batch.step_mask)
  return Credit(token_advantages=per_token, step_advantages=per_step, returns=returns)


def _check_estimate(spec: EstimatorSpec, batch: EpisodeBatch, advantages, returns) -> None:
  """An estimator returns what its spec declares (a toy estimator's slip is one line here, not a broadcast far off)."""
  shapes = {"step": batch.step_mask.shape, "token": batch.tokens.shape}
  check_array(advantages, "estimator", "float", shape=shapes[spec.level],
              like=f"{spec.name!r}'s {spec.level}-level advantages")
  if spec.critic is not None:
    check_array(returns, "estimator", "float", shape=shapes[spec.critic], like=f"{spec.name!r}'s value targets")
