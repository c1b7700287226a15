"""Segments and masked statistics: which action tokens make up each step, which items share a group, and means
over masks.

The layer of `stepjax.types` (imports only jax, numpy and `stepjax.checks`); credit assignment, the losses and the
learner all build on it. Shapes (B episodes, L tokens, S step slots):

    step_ids     [B, L] int    step index of each action token, -1 elsewhere (ids outside [0, S) belong to no step)
    action_mask  [B, L] bool   True on tokens the model generated
    step_mask    [B, S] bool   True on valid steps

    StepSegments.make(action_mask, step_ids, step_mask)   the token -> step map, built once per loss
      .sum(x) / .mean(x)         [B, L] -> [B, S] over each step's tokens (0 on steps without tokens)
      .broadcast(x_steps)        [B, S] -> [B, L] each step's value on its tokens (0 elsewhere)
      .log_ratios(d, reduce)     GSPO's mean / the exact step ratio's sum of token log-ratios
    broadcast_to_tokens(per_step, step_ids)        checked [..., S] -> [..., L]
    mean_per_step(per_token, step_ids, step_mask)  checked [B, L] -> [B, S]
    masked_mean(x, mask)         scalar float32, never NaN
    masked_moments(x, mask)      (mean, population variance) at >= float32
    explained_variance(p, t, m)  1 - Var[t - p] / Var[t] over a mask (critic diagnostics)
    masked_stats(x, mask)        (mean, std) float32: the learner's advantage statistics
    masked_whiten(x, mask)       (x - mean) / sqrt(var + eps) with Bessel's correction, as the reference
    segment_ids(*keys, valid)    dense group ids [N] for items whose int keys are all equal (GRPO groups, anchors)
    group_moments(x, ids, valid) each item's group size, mean and unbiased std [N]

Every masked statistic is over the masked elements of the whole array (not per row); an empty mask gives 0, not NaN.
Sums are scatter-adds over tokens (O(B L) memory, not O(B L S)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from stepjax.checks import check_array, fail

Array = Any

STEP_REDUCTIONS = ("mean", "sum")


def compute_dtype(*xs) -> Any:
  """At least float32 (bfloat16 inputs are summed in float32); float64 when x64 is on and an input is float64."""
  return jnp.result_type(*[x.dtype for x in xs], jnp.float32)


def safe_div(num: Array, den: Array) -> Array:
  """num / max(den, 1): an empty mask's sum (0) divides to 0 instead of NaN."""
  return num / jnp.maximum(den, 1)


# ------------------------------------------------------------------------------------------------------
# Step segments.
# ------------------------------------------------------------------------------------------------------


def _step_sum(x: Array, in_step: Array, step_ids: Array, num_steps: int) -> Array:
  """x [B, L] -> [B, S]: the sum of x over each step's tokens, a scatter-add that drops tokens outside `in_step`."""
  rows = jnp.arange(x.shape[0])[:, None]
  slot = jnp.where(in_step, step_ids, num_steps)  # out of range -> dropped
  return jnp.zeros((x.shape[0], num_steps), x.dtype).at[rows, slot].add(jnp.where(in_step, x, 0), mode="drop")


def _gather_steps(x_steps: Array, step_ids: Array, in_step: Array) -> Array:
  """x_steps [..., S] -> [..., L]: each step's value on the tokens of `in_step`, 0 elsewhere. Its VJP is a sum over
  each step's tokens, so a step's loss sends its gradient to every token of the step."""
  num_steps = x_steps.shape[-1]
  if num_steps == 0:
    return jnp.zeros(step_ids.shape, x_steps.dtype)
  picked = jnp.take_along_axis(x_steps, jnp.clip(step_ids, 0, num_steps - 1), axis=-1)
  return jnp.where(in_step, picked, jnp.zeros((), x_steps.dtype))


@struct.dataclass
class StepSegments:
  """Which tokens belong to which valid step: built once, then read by every per-step sum, mean and broadcast.

  in_step [B, L] bool: action tokens whose step id lies in [0, S). step_ids [B, L] int. count [B, S]: action tokens
  per step (in the compute dtype). valid [B, S] bool: step_mask and at least one token.
  """

  in_step: Array
  step_ids: Array
  count: Array
  valid: Array

  @classmethod
  def make(cls, action_mask: Array, step_ids: Array, step_mask: Array, dtype=jnp.float32) -> "StepSegments":
    """Unchecked (callers check shapes): action_mask, step_ids [B, L]; step_mask [B, S]; dtype of `count`."""
    num_steps = step_mask.shape[1]
    in_step = action_mask & (step_ids >= 0) & (step_ids < num_steps)
    count = _step_sum(in_step.astype(dtype), in_step, step_ids, num_steps)
    return cls(in_step=in_step, step_ids=step_ids, count=count, valid=step_mask & (count > 0))

  @property
  def num_steps(self) -> int:
    return self.count.shape[1]

  def sum(self, x: Array) -> Array:
    """[B, L] -> [B, S] sum over each valid step's tokens, 0 on other steps."""
    return jnp.where(self.valid, _step_sum(x, self.in_step, self.step_ids, self.num_steps), 0)

  def mean(self, x: Array) -> Array:
    """[B, L] -> [B, S] mean over each valid step's tokens, 0 on other steps."""
    return safe_div(self.sum(x), self.count)

  def broadcast(self, x_steps: Array) -> Array:
    """[B, S] -> [B, L]: each step's value on its tokens, 0 elsewhere (the adjoint of `sum`)."""
    return _gather_steps(x_steps, self.step_ids, self.in_step)

  def log_ratios(self, token_log_ratio: Array, reduce: str) -> Array:
    """[B, L] -> [B, S] step log-ratios: "mean" (GSPO, the log of the geometric mean of the token ratios) or "sum"
    (the exact step-MDP ratio, the log of their product)."""
    return self.mean(token_log_ratio) if reduce == "mean" else self.sum(token_log_ratio)


def broadcast_to_tokens(per_step, step_ids) -> Array:
  """per_step [B, S] -> [B, L]: each action token gets its step's value; 0 where step_ids < 0 (or >= S).

  Any matching leading dims: per_step [..., S], step_ids [..., L].
  """
  per_step = jnp.asarray(per_step)
  if per_step.ndim < 1:
    fail("per_step", "expected an array with a step axis [..., S], got a scalar")
  step_ids = check_array(step_ids, "step_ids", "int", convert=True)
  if step_ids.shape[:-1] != per_step.shape[:-1] or step_ids.ndim != per_step.ndim:
    fail("step_ids", f"expected shape {per_step.shape[:-1] + ('L',)} (the leading dims of per_step), got "
         f"{tuple(step_ids.shape)}")
  inside = (step_ids >= 0) & (step_ids < per_step.shape[-1])
  return _gather_steps(per_step, step_ids, inside)


def mean_per_step(per_token, step_ids, step_mask) -> Array:
  """per_token [B, L] -> [B, S]: the mean over each valid step's tokens (step_ids == t); 0 on invalid steps and on
  steps without tokens. Computed at >= float32."""
  per_token = check_array(per_token, "per_token", "float", rank=2, dims="[B, L]", convert=True)
  step_ids = check_array(step_ids, "step_ids", "int", shape=per_token.shape, like="per_token", convert=True)
  step_mask = check_array(step_mask, "step_mask", "bool", rank=2, dims="[B, S]", convert=True)
  if step_mask.shape[0] != per_token.shape[0]:
    fail("step_mask", f"expected {per_token.shape[0]} rows (one per row of per_token), got {step_mask.shape[0]}")
  dtype = compute_dtype(per_token)
  segments = StepSegments.make(step_ids >= 0, step_ids, step_mask, dtype)
  return segments.mean(per_token.astype(dtype))


# ------------------------------------------------------------------------------------------------------
# Masked statistics.
# ------------------------------------------------------------------------------------------------------


def masked_mean(x: Array, mask: Array, empty=0.0) -> Array:
  """Mean of x where mask, as a float32 scalar; `empty` when the mask is empty (never NaN)."""
  x = jnp.asarray(x, jnp.float32)
  count = jnp.sum(mask)
  return jnp.where(count > 0, safe_div(jnp.sum(jnp.where(mask, x, 0)), count), empty).astype(jnp.float32)


def masked_moments(x: Array, mask: Array) -> tuple[Array, Array]:
  """(mean, variance) of x over `mask`, population variance (divides by n), at >= float32; (0, 0) for an empty
  mask. Values off the mask are never read (NaN there stays out)."""
  x = jnp.asarray(x)
  x = x.astype(compute_dtype(x))
  count = jnp.sum(mask)
  mean = safe_div(jnp.sum(jnp.where(mask, x, 0)), count)
  centered = jnp.where(mask, x - mean, 0)
  return mean, safe_div(jnp.sum(centered * centered), count)


def explained_variance(pred: Array, target: Array, mask: Array) -> Array:
  """1 - Var[target - pred] / Var[target] over `mask` (population variances) as a float32 scalar; 0 when
  Var[target] <= 1e-8 (nothing to explain, e.g. an empty mask)."""
  _, var_target = masked_moments(target, mask)
  _, var_residual = masked_moments(target - pred, mask)
  explained = 1.0 - var_residual / jnp.maximum(var_target, 1e-8)
  return jnp.where(var_target > 1e-8, explained, 0.0).astype(jnp.float32)


def masked_stats(x: Array, mask: Array) -> tuple[Array, Array]:
  """(mean, std) of x over `mask` as float32 scalars, std without Bessel's correction; (0, 0) for an empty mask."""
  mean = masked_mean(x, mask)
  return mean, jnp.sqrt(masked_mean(jnp.square(x - mean), mask))


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x − mean)·rsqrt(var + eps) with mean and variance over `mask`; 0 outside the mask. Any shape.

  Statistics are over every masked element of the array (not per row). The variance carries Bessel's correction
  n/(n−1), as the reference implementation's masked_whiten; n ≤ 1 uses no correction (the variance is then 0).
  shift_mean=False adds the mean back. An all-False mask gives all zeros.
  """
  x = check_array(x, "x", "float", convert=True)
  mask = check_array(mask, "mask", "bool", shape=x.shape, like="x", convert=True)
  x = x.astype(compute_dtype(x))
  mean, variance = masked_moments(x, mask)
  count = jnp.sum(mask).astype(x.dtype)
  variance = variance * jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 1.0)
  whitened = (x - mean) * lax.rsqrt(variance + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask, whitened, 0.0)


# ------------------------------------------------------------------------------------------------------
# Group segments: sort-based dense ids for items with equal keys, and per-group moments.
# ------------------------------------------------------------------------------------------------------


def segment_ids(*keys, valid=None):
  """Dense group ids for items whose keys are all equal: each key [N] int -> (ids [N] int32, count [] int32).

  Valid items get ids 0..count−1 (in sorted-key order); invalid items get id N, which jax.ops.segment_sum with
  num_segments = N drops. Keys are arbitrary ints (not limited to < N); one sort, no hashing of the keys.
  """
  if not keys:
    fail("keys", "expected at least one key array")
  first = jnp.asarray(keys[0])
  if first.ndim != 1:
    fail("keys", f"expected 1-D [N] key arrays, got shape {tuple(first.shape)}")
  num_items = first.shape[0]
  checked = []
  for index, key in enumerate(keys):
    key = jnp.asarray(key)
    if key.dtype == jnp.bool_:
      key = key.astype(jnp.int32)
    checked.append(check_array(key, f"keys[{index}]", "int", shape=(num_items,), like="keys[0]", convert=True))
  if valid is None:
    valid = jnp.ones((num_items,), bool)
  valid = check_array(valid, "valid", "bool", shape=(num_items,), like="keys", convert=True)
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


class GroupMoments(NamedTuple):
  """The moments of each item's group (over its valid members)."""

  size: Array  # [N] number of valid items in the item's group
  mean: Array  # [N]
  std: Array  # [N] unbiased (n − 1); 0 for a group of one


def group_moments(x, ids, valid) -> GroupMoments:
  """Per-item statistics of the item's group, over valid items only. x float, ids (from `segment_ids`), valid: [N].

  Unchecked (callers check x and build ids). Invalid items get garbage that callers mask out."""
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
  return GroupMoments(size=size[own], mean=mean, std=std[own])
