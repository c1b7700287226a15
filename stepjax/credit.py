"""Advantage estimators, whitening and broadcasting: pure functions over fixed-shape arrays.

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
* `compute_advantages(config, batch, position_values)` picks an estimator by name (`ESTIMATORS`), whitens
  ("step" or "token") and returns a `Credit` with the per-token advantages the policy loss consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from stepjax.types import EpisodeBatch

Array = Any

GAE_METHODS = ("scan", "associative")
# benchmarks/credit.py: on CPU a plain reverse lax.scan (unroll=1) beats associative_scan and larger unrolls.
DEFAULT_GAE_METHOD = "scan"
DEFAULT_GAE_UNROLL = 1
WHITEN_MODES = ("step", "token", None)
GIGPO_MODES = ("mean_std_norm", "mean_norm")

# Odd multipliers are invertible mod 2**32, which lets a span hash be read off two prefix hashes.
_HASH_MULTIPLIERS = (0x9E3779B1, 0x01000193)


# ------------------------------------------------------------------------------------------------------
# Input checks (trace time, one line naming the argument).
# ------------------------------------------------------------------------------------------------------


def _fail(arg: str, message: str):
  raise ValueError(f"{arg}: {message}")


_KIND_NAMES = {"float": "a float dtype", "bool": "bool", "int": "an integer dtype"}


def _as_array(x, arg: str, kind: str, shape: tuple[int, ...] | None = None, like: str | None = None) -> Array:
  """Converts `x` to a jax array and checks its dtype kind ("float" | "bool" | "int") and, if given, its shape."""
  if x is None or isinstance(x, (str, bytes, dict)):
    _fail(arg, f"expected an array, got {type(x).__name__}")
  x = jnp.asarray(x)
  ok = {"float": jnp.issubdtype(x.dtype, jnp.floating), "bool": x.dtype == jnp.bool_,
        "int": jnp.issubdtype(x.dtype, jnp.integer)}[kind]
  if not ok:
    hint = " (for a 0/1 array pass x > 0)" if kind == "bool" else ""
    _fail(arg, f"expected {_KIND_NAMES[kind]}, got {x.dtype}{hint}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    suffix = f" (the shape of {like})" if like else ""
    _fail(arg, f"expected shape {tuple(shape)}{suffix}, got {tuple(x.shape)}")
  return x


def _check_rate(x, arg: str) -> None:
  """gamma / lam: a scalar; its range [0, 1] is checked only when it is concrete (it may be traced under vmap)."""
  if isinstance(x, bool):
    _fail(arg, f"expected a number in [0, 1], got {x!r}")
  if isinstance(x, jax.core.Tracer):
    if x.ndim != 0:
      _fail(arg, f"expected a scalar, got shape {tuple(x.shape)}")
    return
  try:
    value = np.asarray(x)
  except Exception:  # noqa: BLE001 - anything numpy cannot read is not a number
    _fail(arg, f"expected a number in [0, 1], got {type(x).__name__}")
  if value.ndim != 0 or value.dtype.kind not in "iuf":
    _fail(arg, f"expected a number in [0, 1], got {x!r}")
  if not 0.0 <= float(value) <= 1.0:
    _fail(arg, f"must lie in [0, 1], got {float(value)}")


def _check_choice(value, arg: str, allowed: tuple) -> None:
  if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
    _fail(arg, f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _check_estimator(name, arg: str = "estimator") -> None:
  if not isinstance(name, str) or name not in ESTIMATORS:
    _fail(arg, f"expected one of {', '.join(repr(n) for n in ESTIMATORS)}, got {name!r} (Dr.GRPO is 'grpo' with "
          "normalize_std=False)")


def _check_positive_int(value, arg: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    _fail(arg, f"expected a positive int, got {value!r}")


def _compute_dtype(*xs) -> Any:
  """At least float32: a bfloat16 value head must not make GAE accumulate in bfloat16."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


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
  _check_choice(method, "method", GAE_METHODS)
  _check_positive_int(unroll, "unroll")
  _check_rate(gamma, "gamma")
  _check_rate(lam, "lam")
  rewards = _as_array(rewards, "rewards", "float")
  if rewards.ndim < 1:
    _fail("rewards", "expected an array with a slot axis [..., T], got a scalar")
  values = _as_array(values, "values", "float", rewards.shape, "rewards")
  mask = _as_array(mask, mask_name, "bool", rewards.shape, "rewards")
  episode_shape = rewards.shape[:-1]
  if bootstrap_values is None:
    bootstrap_values = jnp.zeros(episode_shape, values.dtype)
  bootstrap_values = _as_array(bootstrap_values, "bootstrap_values", "float", episode_shape, "rewards without its "
                               "last axis")
  truncated = jnp.zeros(episode_shape, bool) if truncated is None else truncated
  truncated = _as_array(truncated, "truncated", "bool", episode_shape, "rewards without its last axis")
  truncation_as_terminal = _as_array(truncation_as_terminal, "truncation_as_terminal", "bool", ())

  dtype = _compute_dtype(rewards, values, bootstrap_values)
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
# Whitening and broadcasting.
# ------------------------------------------------------------------------------------------------------


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x − mean)·rsqrt(var + eps) with mean and variance over `mask`; 0 outside the mask. Any shape.

  Statistics are over every masked element of the array (not per row). The variance carries Bessel's correction
  n/(n−1), as the reference implementation's masked_whiten; n ≤ 1 uses no correction (the variance is then 0).
  shift_mean=False adds the mean back. An all-False mask gives all zeros.
  """
  x = _as_array(x, "x", "float")
  mask = _as_array(mask, "mask", "bool", x.shape, "x")
  dtype = _compute_dtype(x)
  x = x.astype(dtype)
  weight = mask.astype(dtype)
  count = jnp.sum(weight)
  mean = jnp.sum(x * weight) / jnp.maximum(count, 1.0)
  centered = jnp.where(mask, x - mean, 0.0)
  bessel = jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 1.0)
  variance = jnp.sum(centered * centered) / jnp.maximum(count, 1.0) * bessel
  whitened = (x - mean) * lax.rsqrt(variance + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask, whitened, 0.0)


def broadcast_to_tokens(per_step, step_ids):
  """per_step [B, S] -> [B, L]: each action token gets its step's value; 0 where step_ids < 0 (or ≥ S).

  Any matching leading dims: per_step [..., S], step_ids [..., L].
  """
  per_step = jnp.asarray(per_step)
  if per_step.ndim < 1:
    _fail("per_step", "expected an array with a step axis [..., S], got a scalar")
  step_ids = _as_array(step_ids, "step_ids", "int")
  if step_ids.shape[:-1] != per_step.shape[:-1] or step_ids.ndim != per_step.ndim:
    _fail("step_ids", f"expected shape {per_step.shape[:-1] + ('L',)} (the leading dims of per_step), got "
          f"{tuple(step_ids.shape)}")
  num_steps = per_step.shape[-1]
  inside = (step_ids >= 0) & (step_ids < num_steps)
  if num_steps == 0:
    return jnp.zeros(step_ids.shape, per_step.dtype)
  gathered = jnp.take_along_axis(per_step, jnp.clip(step_ids, 0, num_steps - 1), axis=-1)
  return jnp.where(inside, gathered, jnp.zeros((), per_step.dtype))


def _mean_per_step(per_token, step_ids, num_steps: int):
  """[B, L] -> [B, S] mean over each step's action tokens (0 for steps without tokens)."""
  rows = jnp.arange(per_token.shape[0])[:, None]
  slot = jnp.where(step_ids >= 0, step_ids, num_steps)  # out of range -> dropped
  total = jnp.zeros((per_token.shape[0], num_steps), per_token.dtype).at[rows, slot].add(per_token, mode="drop")
  count = jnp.zeros((per_token.shape[0], num_steps), per_token.dtype).at[rows, slot].add(1.0, mode="drop")
  return total / jnp.maximum(count, 1.0)


# ------------------------------------------------------------------------------------------------------
# Groups: sort-based dense segment ids and per-group moments.
# ------------------------------------------------------------------------------------------------------


def segment_ids(*keys, valid=None):
  """Dense group ids for items whose keys are all equal: each key [N] int -> (ids [N] int32, count [] int32).

  Valid items get ids 0..count−1 (in sorted-key order); invalid items get id N, which jax.ops.segment_sum with
  num_segments = N drops. Keys are arbitrary ints (not limited to < N); one sort, no hashing of the keys.
  """
  if not keys:
    _fail("keys", "expected at least one key array")
  first = jnp.asarray(keys[0])
  if first.ndim != 1:
    _fail("keys", f"expected 1-D [N] key arrays, got shape {tuple(first.shape)}")
  num_items = first.shape[0]
  checked = []
  for index, key in enumerate(keys):
    key = jnp.asarray(key)
    if key.dtype == jnp.bool_:
      key = key.astype(jnp.int32)
    checked.append(_as_array(key, f"keys[{index}]", "int", (num_items,), "keys[0]"))
  valid = jnp.ones((num_items,), bool) if valid is None else _as_array(valid, "valid", "bool", (num_items,), "keys")
  if num_items == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((), jnp.int32)
  # Invalid items sort last (primary key), so valid groups take the dense ids 0..count-1.
  invalid_first_key = jnp.logical_not(valid).astype(jnp.int32)
  order = jnp.arange(num_items, dtype=jnp.int32)
  *sorted_keys, sorted_order = lax.sort((invalid_first_key, *checked, order), dimension=0,
                                        num_keys=len(checked) + 1)
  differs = jnp.zeros((num_items - 1,), bool)
  for key in sorted_keys:  # a loop over the (few) key arrays, not over items
    differs = differs | (key[1:] != key[:-1])
  starts_group = jnp.concatenate([jnp.ones((1,), bool), differs])
  sorted_valid = sorted_keys[0] == 0
  dense = jnp.cumsum(starts_group.astype(jnp.int32)) - 1
  dense = jnp.where(sorted_valid, dense, num_items)
  ids = jnp.zeros((num_items,), jnp.int32).at[sorted_order].set(dense, unique_indices=True)
  count = jnp.sum(starts_group & sorted_valid).astype(jnp.int32)
  return ids, count


class _GroupMoments(NamedTuple):
  size: Array  # [N] number of valid items in the item's group
  mean: Array  # [N]
  std: Array  # [N] unbiased (n − 1); 0 for a group of one


def _group_moments(x, ids, valid) -> _GroupMoments:
  """Per-item statistics of the item's group, over valid items only. x, ids, valid: [N]."""
  num_items = x.shape[0]
  own = jnp.clip(ids, 0, num_items - 1)  # invalid items (id N) read garbage that callers mask out
  size = jax.ops.segment_sum(valid.astype(x.dtype), ids, num_segments=num_items)
  # Average offsets from a member of the group, so a group of tied scores gets its mean (and a 0 advantage)
  # exactly instead of up to rounding, which a division by (std + eps) would blow up.
  pivot = jax.ops.segment_max(jnp.where(valid, x, -jnp.inf), ids, num_segments=num_items)[own]
  offsets = jax.ops.segment_sum(jnp.where(valid, x - pivot, 0.0), ids, num_segments=num_items)
  mean = pivot + offsets[own] / jnp.maximum(size[own], 1.0)
  deviation = jnp.where(valid, x - mean, 0.0)
  squares = jax.ops.segment_sum(deviation * deviation, ids, num_segments=num_items)
  std = jnp.sqrt(squares / jnp.maximum(size - 1.0, 1.0))
  return _GroupMoments(size=size[own], mean=mean, std=std[own])


def _episode_inputs(scores, group_id, valid):
  scores = _as_array(scores, "scores", "float")
  if scores.ndim != 1:
    _fail("scores", f"expected a 1-D [B] array, got shape {tuple(scores.shape)}")
  group_id = _as_array(group_id, "group_id", "int", scores.shape, "scores")
  valid = jnp.ones(scores.shape, bool) if valid is None else _as_array(valid, "valid", "bool", scores.shape, "scores")
  return scores.astype(_compute_dtype(scores)), group_id, valid


def grpo(scores, group_id, valid=None, *, normalize_std=True, eps: float = 1e-6):
  """GRPO: (R − group mean) / (group std + eps), std unbiased (torch.std). [B] -> [B].

  A group of one gets mean 0 and std 1 (as the reference implementation), so its advantage is R / (1 + eps).
  normalize_std=False is Dr.GRPO: R − group mean, no division. Invalid episodes give 0 and are not counted.
  """
  scores, group_id, valid = _episode_inputs(scores, group_id, valid)
  ids, _ = segment_ids(group_id, valid=valid)
  moments = _group_moments(scores, ids, valid)
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
  moments = _group_moments(scores, ids, valid)
  size = moments.size
  leave_one_out = (scores - moments.mean) * size / jnp.maximum(size - 1.0, 1.0)
  return jnp.where(valid, jnp.where(size > 1, leave_one_out, scores), 0.0)


def reinforce_pp(token_rewards, action_mask, *, gamma, eps: float = 1e-8, method: str = DEFAULT_GAE_METHOD):
  """REINFORCE++: discounted return over action tokens, whitened over all action tokens. [B, L] -> [B, L].

  The return is token_gae with V = 0 and λ = 1, treated as terminal (so only action tokens discount).
  """
  token_rewards = _as_array(token_rewards, "token_rewards", "float")
  action_mask = _as_array(action_mask, "action_mask", "bool", token_rewards.shape, "token_rewards")
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
    _fail("action_mask", f"expected shape ({scores.shape[0]}, L) (one row per score), got {tuple(action_mask.shape)}")
  ids, _ = segment_ids(group_id, valid=valid)
  moments = _group_moments(scores, ids, valid)
  centered = scores - jnp.where(moments.size <= 1, 0.0, moments.mean)
  token_mask = action_mask & valid[:, None]
  per_token = jnp.where(token_mask, centered[:, None], 0.0)
  return masked_whiten(per_token, token_mask, eps=eps)


def _normalize_in_groups(x, ids, valid, mode: str, eps: float):
  """GiGPO normalisation of x [N] within groups: mean_std_norm (x−mean)/(std+eps) or mean_norm x−mean."""
  moments = _group_moments(x, ids, valid)
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
  tokens = _as_array(tokens, "tokens", "int")
  if tokens.ndim != 2:
    _fail("tokens", f"expected a rank-2 [B, L] array, got shape {tuple(tokens.shape)}")
  step_start = _as_array(step_start, "step_start", "int")
  if step_start.ndim != 2 or step_start.shape[0] != tokens.shape[0]:
    _fail("step_start", f"expected shape ({tokens.shape[0]}, S), got {tuple(step_start.shape)}")
  step_len = _as_array(step_len, "step_len", "int", step_start.shape, "step_start")
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
  step_mask = _as_array(step_mask, "step_mask", "bool", keys[0].shape, "step_start")
  group_id = _as_array(group_id, "group_id", "int", keys[0].shape[:1], "tokens' batch axis")
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
  _check_choice(mode, "mode", GIGPO_MODES)
  step_rewards = _as_array(step_rewards, "step_rewards", "float")
  if step_rewards.ndim != 2:
    _fail("step_rewards", f"expected a rank-2 [B, S] array, got shape {tuple(step_rewards.shape)}")
  step_mask = _as_array(step_mask, "step_mask", "bool", step_rewards.shape, "step_rewards")
  anchor_ids = _as_array(anchor_ids, "anchor_ids", "int", step_rewards.shape, "step_rewards")
  episode_scores = _as_array(episode_scores, "episode_scores", "float", step_rewards.shape[:1], "step_rewards' "
                             "batch axis")
  group_id = _as_array(group_id, "group_id", "int", step_rewards.shape[:1], "step_rewards' batch axis")
  dtype = _compute_dtype(episode_scores, step_rewards)
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
# Registry: configs choose an estimator by name.
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CreditConfig:
  """Which advantage estimator and how. Validated on construction (and by dataclasses.replace).

  estimator: a name in ESTIMATORS. gamma, lam: in [0, 1] (gamma discounts steps for step-level estimators,
    action tokens for token-level ones). whiten: "step" whitens per-step advantages over valid steps (a long
    step counts as much as a short one) then broadcasts; "token" whitens per-token advantages over action
    tokens; None leaves them. "step" needs a step-level estimator (not token_gae / reinforce_pp /
    reinforce_pp_baseline). Whitening applies to every estimator: set whiten=None to keep GRPO / RLOO / GiGPO
    advantages exactly as their group normalisation leaves them.
  normalize_std: GRPO divides by the group std (False = Dr.GRPO). gigpo_omega, gigpo_mode: GiGPO's step weight
    and normalisation. group_eps: eps of group normalisations; whiten_eps: eps of whitening.
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
    _check_estimator(self.estimator)
    _check_choice(self.whiten, "whiten", WHITEN_MODES)
    _check_choice(self.gigpo_mode, "gigpo_mode", GIGPO_MODES)
    _check_choice(self.gae_method, "gae_method", GAE_METHODS)
    _check_positive_int(self.gae_unroll, "gae_unroll")
    _check_rate(self.gamma, "gamma")
    _check_rate(self.lam, "lam")
    if self.whiten == "step" and self.estimator in _TOKEN_LEVEL:
      _fail("whiten", f"'step' needs per-step advantages but {self.estimator!r} gives per-token ones; use 'token' "
            "or None")


@struct.dataclass
class Credit:
  """What an estimator hands the losses.

  token_advantages: [B, L] per action token (0 elsewhere): what the policy loss consumes.
  step_advantages: [B, S] per valid step (0 elsewhere); for token-level estimators the mean over the step's tokens.
  returns: value targets before whitening: [B, S] for a step critic, [B, L] for a token critic, None without one.
  critic: "step" | "token" | None, the level the value head is read at (static).
  """

  token_advantages: Array
  step_advantages: Array
  returns: Array | None = None
  critic: str | None = struct.field(pytree_node=False, default=None)


class _Estimate(NamedTuple):
  per_step: Array | None  # [B, S] for step-level estimators
  per_token: Array | None  # [B, L] for token-level estimators
  returns: Array | None


def _episode_valid(batch: EpisodeBatch):
  """Episodes without a valid step have no tokens to credit and stay out of group statistics."""
  return jnp.any(batch.step_mask, axis=1)


def _per_step(batch: EpisodeBatch, per_episode):
  return jnp.where(batch.step_mask, per_episode[:, None], 0.0)


def _step_gae_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  advantages, returns = step_gae(
      batch.step_rewards, batch.step_values(position_values), batch.step_mask, gamma=config.gamma, lam=config.lam,
      bootstrap_values=batch.bootstrap_values(position_values), truncated=batch.truncated,
      truncation_as_terminal=config.truncation_as_terminal, method=config.gae_method, unroll=config.gae_unroll)
  return _Estimate(per_step=advantages, per_token=None, returns=returns)


def _token_gae_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  advantages, returns = token_gae(
      batch.token_rewards(), batch.token_values(position_values), batch.action_mask, gamma=config.gamma,
      lam=config.lam, bootstrap_values=batch.bootstrap_values(position_values), truncated=batch.truncated,
      truncation_as_terminal=config.truncation_as_terminal, method=config.gae_method, unroll=config.gae_unroll)
  return _Estimate(per_step=None, per_token=advantages, returns=returns)


def _grpo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  del position_values
  advantages = grpo(batch.episode_returns(), batch.group_id, _episode_valid(batch),
                    normalize_std=config.normalize_std, eps=config.group_eps)
  return _Estimate(per_step=_per_step(batch, advantages), per_token=None, returns=None)


def _rloo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  del config, position_values
  advantages = rloo(batch.episode_returns(), batch.group_id, _episode_valid(batch))
  return _Estimate(per_step=_per_step(batch, advantages), per_token=None, returns=None)


def _reinforce_pp_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  del position_values
  advantages = reinforce_pp(batch.token_rewards(), batch.action_mask, gamma=config.gamma, eps=config.whiten_eps,
                            method=config.gae_method)
  return _Estimate(per_step=None, per_token=advantages, returns=None)


def _reinforce_pp_baseline_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  del position_values
  advantages = reinforce_pp_baseline(batch.episode_returns(), batch.group_id, batch.action_mask,
                                     _episode_valid(batch), eps=config.whiten_eps)
  return _Estimate(per_step=None, per_token=advantages, returns=None)


def _gigpo_estimator(config: CreditConfig, batch: EpisodeBatch, position_values) -> _Estimate:
  del position_values
  anchors, _ = anchor_state_ids(batch.tokens, batch.step_start, batch.step_len, batch.step_mask, batch.group_id)
  advantages = gigpo(batch.episode_returns(), batch.step_rewards, batch.step_mask, batch.group_id, anchors,
                     gamma=config.gamma, omega=config.gigpo_omega, mode=config.gigpo_mode, eps=config.group_eps)
  return _Estimate(per_step=advantages, per_token=None, returns=None)


ESTIMATORS: dict[str, Callable[[CreditConfig, EpisodeBatch, Array], _Estimate]] = {
    "step_gae": _step_gae_estimator,
    "token_gae": _token_gae_estimator,
    "grpo": _grpo_estimator,
    "rloo": _rloo_estimator,
    "reinforce_pp": _reinforce_pp_estimator,
    "reinforce_pp_baseline": _reinforce_pp_baseline_estimator,
    "gigpo": _gigpo_estimator,
}
_CRITIC_LEVEL = {"step_gae": "step", "token_gae": "token"}
_TOKEN_LEVEL = ("token_gae", "reinforce_pp", "reinforce_pp_baseline")  # estimators that produce per-token advantages


def get_estimator(name: str) -> Callable[[CreditConfig, EpisodeBatch, Array], _Estimate]:
  """The registered estimator `fn(config, batch, position_values)`; ValueError naming the allowed names."""
  _check_estimator(name)
  return ESTIMATORS[name]


def critic_level(name: str) -> str | None:
  """Where the estimator reads the value head: "step", "token", or None for critic-free estimators."""
  _check_estimator(name)
  return _CRITIC_LEVEL.get(name)


def compute_advantages(config: CreditConfig, batch: EpisodeBatch, position_values=None) -> Credit:
  """Runs `config.estimator` on a batch, whitens per `config.whiten` and returns a `Credit`.

  Args:
    config: a CreditConfig (hashable: pass it as a static argument of jax.jit).
    batch: an EpisodeBatch [B, L] with S step slots.
    position_values: [B, L] float, a value head's output at every position; required by step_gae / token_gae,
      ignored by critic-free estimators.
  """
  if not isinstance(config, CreditConfig):
    _fail("config", f"expected a CreditConfig, got {type(config).__name__}")
  batch.validate()
  critic = critic_level(config.estimator)
  if critic is not None:
    if position_values is None:
      _fail("position_values", f"{config.estimator!r} needs a critic: pass the value head's [B, L] output")
    position_values = _as_array(position_values, "position_values", "float", batch.tokens.shape, "batch.tokens")
  estimate = get_estimator(config.estimator)(config, batch, position_values)
  num_steps = batch.max_steps
  if estimate.per_token is None:
    per_step = estimate.per_step
    if config.whiten == "step":
      per_step = masked_whiten(per_step, batch.step_mask, eps=config.whiten_eps)
    per_token = broadcast_to_tokens(per_step, batch.step_ids)
    if config.whiten == "token":
      per_token = masked_whiten(per_token, batch.action_mask, eps=config.whiten_eps)
      per_step = jnp.where(batch.step_mask, _mean_per_step(per_token, batch.step_ids, num_steps), 0.0)
  else:
    per_token = estimate.per_token
    if config.whiten == "token":
      per_token = masked_whiten(per_token, batch.action_mask, eps=config.whiten_eps)
    per_step = jnp.where(batch.step_mask, _mean_per_step(per_token, batch.step_ids, num_steps), 0.0)
  return Credit(token_advantages=per_token, step_advantages=per_step, returns=estimate.returns, critic=critic)
