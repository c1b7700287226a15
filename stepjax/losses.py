"""Policy losses, value losses, KL penalties, entropy and loss aggregation over action tokens: pure functions.

Shapes (B episodes, L tokens, S step slots; see `stepjax.types.EpisodeBatch`):

    logp, old_logp   [B, L] float  log-prob of each token under the current / the acting policy, untempered
                                   (`EpisodeBatch.logprobs`; aligned to the token it scores)
    advantages       [B, L] float  per-token advantages (a step estimator broadcasts A_t to the step's tokens)
    action_mask      [B, L] bool   True on tokens the model generated
    step_ids         [B, L] int    step index of each action token, -1 elsewhere
    step_mask        [B, S] bool   True on valid steps

Values off action tokens are ignored (masked before any arithmetic, so garbage there cannot leak NaN into grads).

Three policy losses share one clipped surrogate, and differ only in the *ratio unit* (`RATIO_UNITS`):

    loss        ratio unit  one ratio per ...      the ratio
    ppo         token       action token           r = exp(logp - old_logp)
    gspo        step-mean   step                   s = exp(mean over the step's tokens of (logp - old_logp))
    step_ratio  step-sum    step (the exact one)   s = exp(sum  over the step's tokens of (logp - old_logp))

A step unit's advantage is the mean of its tokens' advantages; its loss is broadcast back to its tokens, and the
token losses are reduced by one of `AGG_MODES` (see `aggregate`). Every loss returns `(scalar, metrics)` with
`metrics` a dict of float32 scalars.

Defaults follow the reference PyTorch implementation (veRL-based), see `DEFAULT_CLIP`. Note that the reference works
on `StepRows` (one row per step), so its `seq-mean-token-mean` is our `step-mean` and its `token-mean` is ours.

Bad input (wrong shape or dtype, unknown name, impossible hyperparameter) raises ValueError at trace time with one
line naming the argument and what is allowed. Hyperparameters may be traced (to `vmap` over a sweep); they are
range-checked only when concrete.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax.checks import check_array, check_choice, check_hyper, fail
# masked_mean lives in segments; it stays importable from here.
from stepjax.segments import STEP_REDUCTIONS, StepSegments, compute_dtype, explained_variance, masked_mean, safe_div
from stepjax.types import Array, EpisodeBatch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "step-mean")

# (clip_low, clip_high) of the reference implementation: PPO's 0.2; GSPO's sequence-level ratios sit much closer to
# 1, so its paper (and veRL's GSPO recipe) clips at 3e-4 / 4e-4; the exact step ratio is clipped like PPO.
DEFAULT_CLIP = {"ppo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "step_ratio": (0.2, 0.2)}
DEFAULT_LOG_RATIO_CLAMP = 20.0  # veRL clamps the log-ratio to +-20 before exp, so a stale token cannot overflow
LOW_VAR_KL_CLAMP = 10.0  # veRL clamps the k3 estimate to +-10

KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
RATIO_UNITS = {"ppo": "token", "gspo": "step-mean", "step_ratio": "step-sum"}  # step-X: X of the token log-ratios


# ------------------------------------------------------------------------------------------------------
# Validation (trace time; one line naming the argument).
# ------------------------------------------------------------------------------------------------------


def _check_token_masks(action_mask, step_ids, step_mask, shape: tuple[int, int], need_steps: bool, like: str) -> None:
  check_array(action_mask, "action_mask", "bool", shape=shape, like=like)
  if need_steps or step_ids is not None:
    if step_ids is None:
      fail("step_ids", "required by agg_mode 'step-mean'")
    check_array(step_ids, "step_ids", "int", shape=shape, like="action_mask [B, L]")
  if need_steps or step_mask is not None:
    if step_mask is None:
      fail("step_mask", "required by agg_mode 'step-mean'")
    check_array(step_mask, "step_mask", "bool", rank=2, dims="[B, S]")
    if step_mask.shape[0] != shape[0]:
      fail("step_mask", f"expected shape ({shape[0]}, S) (B of action_mask), got {tuple(step_mask.shape)}")


# ------------------------------------------------------------------------------------------------------
# Aggregation.
# ------------------------------------------------------------------------------------------------------


def aggregate(loss_tokens: Array, action_mask: Array, step_ids: Array | None = None, step_mask: Array | None = None,
              mode: str = "token-mean") -> Array:
  """Reduces per-token losses [B, L] over action tokens to a scalar. Empty masks give 0.

    token-mean           sum(l * m) / sum(m) over the whole batch (long steps and episodes weigh more)
    seq-mean-token-mean  mean over rows with >= 1 action token of the row's token-mean
    seq-mean-token-sum   mean over rows with >= 1 action token of the row's token sum
    step-mean            mean over valid steps of the step's token-mean (every step weighs the same; equals the
                         reference's seq-mean-token-mean on one-row-per-step data). Needs step_ids [B, L] and
                         step_mask [B, S]; a step counts when step_mask is True and it has >= 1 action token.
  """
  check_choice(mode, "mode", AGG_MODES)
  check_array(loss_tokens, "loss_tokens", "float", rank=2, dims="[B, L]")
  _check_token_masks(action_mask, step_ids, step_mask, loss_tokens.shape, need_steps=mode == "step-mean",
                     like="loss_tokens [B, L]")
  dtype = compute_dtype(loss_tokens)
  x = jnp.where(action_mask, loss_tokens.astype(dtype), 0)
  count = action_mask.astype(dtype)
  if mode == "token-mean":
    return safe_div(jnp.sum(x), jnp.sum(count))
  if mode == "step-mean":
    segments = StepSegments.make(action_mask, step_ids, step_mask, dtype)
    return safe_div(jnp.sum(segments.mean(x)), jnp.sum(segments.valid).astype(dtype))
  row_sum, row_count = jnp.sum(x, axis=1), jnp.sum(count, axis=1)
  per_row = safe_div(row_sum, row_count) if mode == "seq-mean-token-mean" else row_sum
  has_tokens = row_count > 0
  return safe_div(jnp.sum(jnp.where(has_tokens, per_row, 0)), jnp.sum(has_tokens).astype(dtype))


# ------------------------------------------------------------------------------------------------------
# Policy losses.
# ------------------------------------------------------------------------------------------------------


def _check_policy_inputs(logp, old_logp, advantages, action_mask, step_ids, step_mask) -> None:
  check_array(logp, "logp", "float", rank=2, dims="[B, L]")
  shape = tuple(logp.shape)
  check_array(old_logp, "old_logp", "float", shape=shape, like="logp [B, L]")
  check_array(advantages, "advantages", "float", shape=shape, like="logp [B, L]")
  _check_token_masks(action_mask, step_ids, step_mask, shape, need_steps=True, like="logp [B, L]")


def _is_float_array(x) -> bool:
  return isinstance(x, np.ndarray) and x.dtype.kind == "f"


def _check_clip_args(clip_low, clip_high, dual_clip, log_ratio_clamp) -> None:
  check_hyper(clip_low, "clip_low", lambda v: (v >= 0) & (v < 1), "in [0, 1) (the ratio's lower bound 1 - clip_low "
               "must stay positive)")
  check_hyper(clip_high, "clip_high", lambda v: v >= 0, ">= 0")
  check_hyper(dual_clip, "dual_clip", lambda v: v > 1, "> 1 (or None to disable dual clipping)")
  check_hyper(log_ratio_clamp, "log_ratio_clamp", lambda v: v > 0, "> 0")


def step_log_ratios(logp: Array, old_logp: Array, action_mask: Array, step_ids: Array, step_mask: Array, *,
                    reduce: str = "mean") -> Array:
  """The log importance ratio of each step [B, S] (0 on invalid steps), over the step's action tokens.

  reduce="mean": mean of (logp - old_logp), GSPO's length-normalised ratio (the geometric mean of token ratios).
  reduce="sum":  sum of (logp - old_logp), the exact ratio of the step-level MDP (the product of token ratios).
  """
  check_choice(reduce, "reduce", STEP_REDUCTIONS)
  _check_policy_inputs(logp, old_logp, old_logp, action_mask, step_ids, step_mask)
  dtype = compute_dtype(logp, old_logp)
  segments = StepSegments.make(action_mask, step_ids, step_mask, dtype)
  return segments.log_ratios(logp.astype(dtype) - old_logp.astype(dtype), reduce)


def _clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip):
  """Per-unit loss -min(r A, clip(r) A), with dual-clip PPO's cap -c A on negative advantages.

  Returns (loss, clipped, dual_clipped): the two bool arrays say which bound is active (for metrics).
  """
  unclipped = -adv * ratio
  clipped_loss = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(unclipped, clipped_loss)
  clipped = clipped_loss > unclipped
  if dual_clip is None:
    return loss, clipped, jnp.zeros_like(clipped)
  # For A < 0 a huge ratio makes -r A unbounded; dual clip caps it at -c A (Ye et al., 2020).
  cap = -adv * dual_clip
  dual_clipped = (adv < 0) & (loss > cap)
  return jnp.where(adv < 0, jnp.minimum(loss, cap), loss), clipped, dual_clipped


def _policy_loss(ratio_unit, logp, old_logp, advantages, action_mask, step_ids, step_mask, *, clip_low, clip_high,
                 dual_clip, agg_mode, log_ratio_clamp):
  """The clipped surrogate over `ratio_unit` units: "token", "step-mean" or "step-sum" (see `RATIO_UNITS`)."""
  _check_policy_inputs(logp, old_logp, advantages, action_mask, step_ids, step_mask)
  check_choice(agg_mode, "agg_mode", AGG_MODES)
  _check_clip_args(clip_low, clip_high, dual_clip, log_ratio_clamp)
  dtype = compute_dtype(logp, old_logp, advantages)
  logp = jnp.where(action_mask, logp.astype(dtype), 0)
  old_logp = jnp.where(action_mask, old_logp.astype(dtype), 0)
  advantages = jnp.where(action_mask, advantages.astype(dtype), 0)

  if ratio_unit == "token":
    unit_mask, log_ratio, unit_adv = action_mask, logp - old_logp, advantages
  else:
    segments = StepSegments.make(action_mask, step_ids, step_mask, dtype)
    unit_mask = segments.valid
    log_ratio = segments.log_ratios(logp - old_logp, reduce=ratio_unit.removeprefix("step-"))
    unit_adv = segments.mean(advantages)

  log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  unit_loss, clipped, dual_clipped = _clipped_surrogate(ratio, unit_adv, clip_low, clip_high, dual_clip)
  unit_loss = jnp.where(unit_mask, unit_loss, 0)
  # A step's loss goes to each of its tokens, so the gradient reaches every token through the step's ratio.
  loss_tokens = unit_loss if ratio_unit == "token" else segments.broadcast(unit_loss)
  loss = aggregate(loss_tokens, action_mask, step_ids, step_mask, agg_mode)

  ratio, unit_adv = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(unit_adv)
  has_units = jnp.any(unit_mask)
  metrics = {
      "clip_frac": masked_mean(clipped, unit_mask),
      "clip_frac_low": masked_mean(clipped & (unit_adv < 0), unit_mask),  # ratio fell below 1 - clip_low
      "clip_frac_high": masked_mean(clipped & (unit_adv > 0), unit_mask),  # ratio rose above 1 + clip_high
      "dual_clip_frac": masked_mean(dual_clipped, unit_mask),
      "approx_kl": masked_mean(jax.lax.stop_gradient(old_logp - logp), action_mask),
      "log_ratio_clamp_frac": masked_mean(jnp.abs(jax.lax.stop_gradient(log_ratio)) >= log_ratio_clamp, unit_mask),
      # With no ratio units at all the ratio stats read a neutral 1.
      "ratio_mean": masked_mean(ratio, unit_mask, empty=1.0),
      "ratio_min": jnp.where(has_units, jnp.min(jnp.where(unit_mask, ratio, jnp.inf)), 1.0).astype(jnp.float32),
      "ratio_max": jnp.where(has_units, jnp.max(jnp.where(unit_mask, ratio, -jnp.inf)), 1.0).astype(jnp.float32),
  }
  return loss, metrics


def ppo_loss(logp: Array, old_logp: Array, advantages: Array, action_mask: Array, step_ids: Array, step_mask: Array,
             *, clip_low=0.2, clip_high=0.2, dual_clip=None, agg_mode: str = "token-mean",
             log_ratio_clamp=DEFAULT_LOG_RATIO_CLAMP) -> tuple[Array, dict[str, Array]]:
  """Token-level PPO: r = exp(logp - old_logp) per action token, loss -min(r A, clip(r, 1 - lo, 1 + hi) A).

  logp, old_logp, advantages [B, L]; action_mask, step_ids [B, L]; step_mask [B, S] (used by agg_mode step-mean).
  dual_clip c > 1 caps the loss of negative-advantage tokens at -c A. The token log-ratio is clamped to
  +-log_ratio_clamp before exp, as in the reference. Ratio metrics are over action tokens. Returns (loss [], metrics).
  """
  return _policy_loss(RATIO_UNITS["ppo"], logp, old_logp, advantages, action_mask, step_ids, step_mask,
                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg_mode=agg_mode,
                      log_ratio_clamp=log_ratio_clamp)


def gspo_loss(logp: Array, old_logp: Array, advantages: Array, action_mask: Array, step_ids: Array, step_mask: Array,
              *, clip_low=3e-4, clip_high=4e-4, dual_clip=None, agg_mode: str = "token-mean",
              log_ratio_clamp=DEFAULT_LOG_RATIO_CLAMP) -> tuple[Array, dict[str, Array]]:
  """Step-level GSPO: one ratio per step s = exp(mean over the step's tokens of (logp - old_logp)), clipped per step.

  The step's advantage is the mean of its token advantages; the per-step loss -min(s A, clip(s) A) is broadcast to
  the step's tokens and aggregated by agg_mode. Shapes as in `ppo_loss`; ratio metrics are over valid steps.
  """
  return _policy_loss(RATIO_UNITS["gspo"], logp, old_logp, advantages, action_mask, step_ids, step_mask,
                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg_mode=agg_mode,
                      log_ratio_clamp=log_ratio_clamp)


def step_ratio_loss(logp: Array, old_logp: Array, advantages: Array, action_mask: Array, step_ids: Array,
                    step_mask: Array, *, clip_low=0.2, clip_high=0.2, dual_clip=None, agg_mode: str = "token-mean",
                    log_ratio_clamp=DEFAULT_LOG_RATIO_CLAMP) -> tuple[Array, dict[str, Array]]:
  """Exact step-MDP ratio: s = exp(clamp(sum over the step's tokens of (logp - old_logp), +-log_ratio_clamp)).

  Clipped per step like PPO (a long step's product of token ratios drifts far faster than a mean, hence the clamp).
  Shapes as in `ppo_loss`; ratio metrics are over valid steps.
  """
  return _policy_loss(RATIO_UNITS["step_ratio"], logp, old_logp, advantages, action_mask, step_ids, step_mask,
                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg_mode=agg_mode,
                      log_ratio_clamp=log_ratio_clamp)


POLICY_LOSSES = {"ppo": ppo_loss, "gspo": gspo_loss, "step_ratio": step_ratio_loss}


def get_policy_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
  check_choice(name, "name", tuple(POLICY_LOSSES))
  return POLICY_LOSSES[name]


@struct.dataclass
class PolicyLossConfig:
  """Which policy loss and its hyperparameters (frozen; a pytree whose numbers are leaves, so a jitted train step
  takes it as an argument and a sweep can `vmap` over clip values; `name` and `agg_mode` are static).

  clip_low / clip_high None take the loss's reference default (`DEFAULT_CLIP`): ppo 0.2 / 0.2, gspo 3e-4 / 4e-4,
  step_ratio 0.2 / 0.2. agg_mode defaults to token-mean, the reference's default `loss_agg_mode`.

  Validated on construction (and by `replace`) as far as that is free: names always, numbers when they are host
  floats (Python or numpy). Ints and device values are checked by `validate` (which `policy_loss` runs).
  """

  name: str = struct.field(pytree_node=False, default="gspo")
  clip_low: float | None = None
  clip_high: float | None = None
  dual_clip: float | None = None  # c > 1 enables dual clipping (the reference's clip_ratio_c is 3.0 when on)
  agg_mode: str = struct.field(pytree_node=False, default="token-mean")
  log_ratio_clamp: float = DEFAULT_LOG_RATIO_CLAMP

  def __post_init__(self):
    # This also runs on every unflatten, whose leaves need not be hyperparameters: tracers (jit, vmap), placeholder
    # objects (jax's tree utilities), ints (vmap axis specs shaped like the config), device arrays (reading one
    # would block). So only host floats are range-checked here; `validate` checks every concrete value.
    self._check(lambda x: x if isinstance(x, (float, np.floating)) or _is_float_array(x) else None)

  def clip_range(self) -> tuple:
    """(clip_low, clip_high) with None resolved to the loss's default."""
    default_low, default_high = DEFAULT_CLIP[self.name]
    return (default_low if self.clip_low is None else self.clip_low,
            default_high if self.clip_high is None else self.clip_high)

  def validate(self) -> "PolicyLossConfig":
    """Checks names and (concrete) ranges; raises ValueError naming the field. Returns self so it chains."""
    self._check(lambda x: x)
    return self

  def _check(self, checkable: Callable) -> None:
    """Names, then the numbers that `checkable` keeps (it maps the others to None, which passes)."""
    check_choice(self.name, "name", tuple(POLICY_LOSSES))
    check_choice(self.agg_mode, "agg_mode", AGG_MODES)
    _check_clip_args(*map(checkable, (*self.clip_range(), self.dual_clip, self.log_ratio_clamp)))


def policy_loss(config: PolicyLossConfig, logp: Array, old_logp: Array, advantages: Array, action_mask: Array,
                step_ids: Array, step_mask: Array) -> tuple[Array, dict[str, Array]]:
  """The configured policy loss: (loss [], metrics). Shapes as in `ppo_loss`."""
  config.validate()
  clip_low, clip_high = config.clip_range()
  return get_policy_loss(config.name)(logp, old_logp, advantages, action_mask, step_ids, step_mask,
                                      clip_low=clip_low, clip_high=clip_high, dual_clip=config.dual_clip,
                                      agg_mode=config.agg_mode, log_ratio_clamp=config.log_ratio_clamp)


# ------------------------------------------------------------------------------------------------------
# Value losses.
# ------------------------------------------------------------------------------------------------------


def value_loss(pred: Array, returns: Array, mask: Array, *, old_values: Array | None = None,
               clip_eps=None) -> tuple[Array, dict[str, Array]]:
  """0.5 (pred - R)^2, masked mean. pred, returns, mask (and old_values) share one shape: [B, S] for a step critic,
  [B, L] for a token critic.

  With clip_eps (needs old_values, the values the advantages were computed with), PPO value clipping:
  0.5 max((pred - R)^2, (old + clip(pred - old, -eps, eps) - R)^2), as in the reference (its default eps is 0.5).
  old_values without clip_eps is ignored. Metrics: vf_clip_frac (where the clipped term is larger),
  explained_variance (1 - Var[R - pred] / Var[R] over the mask; 0 when Var[R] is ~0), value_mean, return_mean.
  """
  check_array(pred, "pred", "float")
  check_array(returns, "returns", "float", shape=pred.shape, like="pred")
  check_array(mask, "mask", "bool", shape=pred.shape, like="pred")
  if clip_eps is not None and old_values is None:
    fail("old_values", "required when clip_eps is set (value clipping is relative to the old values)")
  check_hyper(clip_eps, "clip_eps", lambda v: v >= 0, ">= 0 (or None to disable value clipping)")
  use_clip = clip_eps is not None
  if use_clip:
    check_array(old_values, "old_values", "float", shape=pred.shape, like="pred")
  dtype = compute_dtype(pred, returns, *([old_values] if use_clip else []))
  pred = jnp.where(mask, pred.astype(dtype), 0)
  returns = jnp.where(mask, returns.astype(dtype), 0)
  squared = jnp.square(pred - returns)
  if use_clip:
    old = jnp.where(mask, old_values.astype(dtype), 0)
    squared_clipped = jnp.square(old + jnp.clip(pred - old, -clip_eps, clip_eps) - returns)
    clip_active = squared_clipped > squared
    squared = jnp.maximum(squared, squared_clipped)
  else:
    clip_active = jnp.zeros(pred.shape, bool)
  count = jnp.sum(mask).astype(dtype)
  loss = 0.5 * safe_div(jnp.sum(jnp.where(mask, squared, 0)), count)

  pred, returns = jax.lax.stop_gradient(pred), jax.lax.stop_gradient(returns)

  metrics = {
      "vf_clip_frac": masked_mean(clip_active, mask),
      "explained_variance": explained_variance(pred, returns, mask),
      "value_mean": masked_mean(pred, mask),
      "return_mean": masked_mean(returns, mask),
  }
  return loss, metrics


def _check_position_values(batch: EpisodeBatch, position_values) -> None:
  check_array(position_values, "position_values", "float", shape=batch.tokens.shape, like="batch.tokens [B, L]")


def step_value_loss(batch: EpisodeBatch, position_values: Array, returns: Array, *, old_values: Array | None = None,
                    clip_eps=None) -> tuple[Array, dict[str, Array]]:
  """Step critic: V(s_t) read at step_start - 1 from one forward's value head output position_values [B, L].

  returns [B, S] (e.g. step GAE targets), old_values [B, S] (the step values the advantages used). Masked by
  batch.step_mask.
  """
  _check_position_values(batch, position_values)
  check_array(returns, "returns", "float", shape=batch.step_mask.shape, like="batch.step_mask [B, S]")
  return value_loss(batch.step_values(position_values), returns, batch.step_mask, old_values=old_values,
                    clip_eps=clip_eps)


def token_value_loss(batch: EpisodeBatch, position_values: Array, returns: Array, *, old_values: Array | None = None,
                     clip_eps=None) -> tuple[Array, dict[str, Array]]:
  """Token critic: the value before each action token (read at p - 1) from position_values [B, L].

  returns [B, L], old_values [B, L] (aligned to the action token, like `batch.token_values`). Masked by
  batch.action_mask.
  """
  _check_position_values(batch, position_values)
  check_array(returns, "returns", "float", shape=batch.action_mask.shape, like="batch.action_mask [B, L]")
  return value_loss(batch.token_values(position_values), returns, batch.action_mask, old_values=old_values,
                    clip_eps=clip_eps)


# ------------------------------------------------------------------------------------------------------
# KL to a reference policy.
# ------------------------------------------------------------------------------------------------------


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "low_var_kl") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs [B, L] (any equal shapes) -> [B, L].

    k1 / kl           logp - ref_logp                      (unbiased, high variance, can be negative)
    abs               |logp - ref_logp|
    k2 / mse          0.5 (logp - ref_logp)^2
    k3 / low_var_kl   exp(ref - logp) - (ref - logp) - 1   (unbiased, >= 0; log-ratio clamped to +-20 and the
                                                            estimate to [-10, 10], as in the reference)
  """
  check_choice(kind, "kind", KL_KINDS)
  check_array(logp, "logp", "float")
  check_array(ref_logp, "ref_logp", "float", shape=logp.shape, like="logp")
  dtype = compute_dtype(logp, ref_logp)
  diff = logp.astype(dtype) - ref_logp.astype(dtype)
  if kind in ("k1", "kl"):
    return diff
  if kind == "abs":
    return jnp.abs(diff)
  if kind in ("k2", "mse"):
    return 0.5 * jnp.square(diff)
  log_ratio = jnp.clip(-diff, -DEFAULT_LOG_RATIO_CLAMP, DEFAULT_LOG_RATIO_CLAMP)
  return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def kl_loss(logp: Array, ref_logp: Array, action_mask: Array, step_ids: Array | None = None,
            step_mask: Array | None = None, *, kind: str = "low_var_kl",
            agg_mode: str = "token-mean") -> tuple[Array, dict[str, Array]]:
  """`kl_penalty` over action tokens [B, L], aggregated like the policy loss (step-mean needs step_ids, step_mask).

  Returns (loss [], {"kl": loss, "kl_max": largest per-token estimate}). Defaults are the reference's
  (kl_loss_type low_var_kl, token-mean).
  """
  check_choice(agg_mode, "agg_mode", AGG_MODES)
  check_choice(kind, "kind", KL_KINDS)
  check_array(logp, "logp", "float", rank=2, dims="[B, L]")
  check_array(ref_logp, "ref_logp", "float", shape=logp.shape, like="logp [B, L]")
  check_array(action_mask, "action_mask", "bool", shape=logp.shape, like="logp [B, L]")
  # Garbage off the mask must not reach the backward pass.
  logp, ref_logp = jnp.where(action_mask, logp, 0), jnp.where(action_mask, ref_logp, 0)
  kl_tokens = kl_penalty(logp, ref_logp, kind)
  loss = aggregate(kl_tokens, action_mask, step_ids, step_mask, agg_mode)
  kl_max = jnp.where(jnp.any(action_mask), jnp.max(jnp.where(action_mask, kl_tokens, -jnp.inf)), 0.0)
  return loss, {"kl": jax.lax.stop_gradient(loss).astype(jnp.float32),
                "kl_max": jax.lax.stop_gradient(kl_max).astype(jnp.float32)}


# ------------------------------------------------------------------------------------------------------
# Entropy and log-probs from logits.
# ------------------------------------------------------------------------------------------------------


def _check_vocab_logits(logits) -> None:
  check_array(logits, "logits", "float")
  if logits.ndim < 1 or logits.shape[-1] < 1:
    fail("logits", f"expected a [..., V] array with V >= 1, got shape {tuple(logits.shape)}")


def _shift_by_max(z: Array) -> Array:
  """z - max(z) over the vocabulary. Log-softmax and entropy are shift-invariant, and near 0 the sum of p z does not
  cancel catastrophically (with logits ~1e4, float32 rounding of p alone would cost O(1) nats)."""
  top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  return z - jnp.where(jnp.isfinite(top), top, 0)


def entropy_from_logits(logits: Array) -> Array:
  """logits [B, L, V] (any [..., V]) -> entropy [B, L] of softmax(logits), in float32 at least.

  H = logsumexp(z) - sum softmax(z) z: stable for large logits, and -inf logits (a masked vocabulary) contribute 0
  with finite gradients.
  """
  _check_vocab_logits(logits)
  z = _shift_by_max(logits.astype(compute_dtype(logits)))
  lse = jax.nn.logsumexp(z, axis=-1)
  probs = jnp.exp(z - lse[..., None])
  finite_z = jnp.where(jnp.isfinite(z), z, 0)  # 0 * -inf would be NaN; those tokens have probability 0
  return lse - jnp.sum(probs * finite_z, axis=-1)


def logprobs_from_logits(logits: Array, tokens: Array) -> Array:
  """logits [B, L, V], tokens [B, L] int -> log softmax(logits)[b, l, tokens[b, l]] [B, L] (no shift).

  Token ids must lie in [0, V). See `shifted_logprobs` for the usual causal-LM alignment.
  """
  _check_vocab_logits(logits)
  check_array(tokens, "tokens", "int", shape=logits.shape[:-1], like="logits without the vocabulary axis")
  z = _shift_by_max(logits.astype(compute_dtype(logits)))
  picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(z, axis=-1)


def shifted_logprobs(logits: Array, tokens: Array) -> Array:
  """Causal-LM alignment: logits at position p predict token p + 1. logits [B, L, V], tokens [B, L] -> [B, L]
  where out[:, p] = log pi(tokens[:, p] | tokens[:, :p]) for p >= 1 and out[:, 0] = 0 (nothing predicts it).

  This is the layout of `EpisodeBatch.logprobs` (each log-prob sits on the token it scores).
  """
  check_array(logits, "logits", rank=3, dims="[B, L, V]")
  check_array(tokens, "tokens", "int", shape=logits.shape[:-1], like="logits without the vocabulary axis, [B, L]")
  # Score each position's *next* token, then move the result one step right (avoids slicing the [B, L, V] logits).
  next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  scores_next = logprobs_from_logits(logits, next_tokens)
  return jnp.pad(scores_next[:, :-1], ((0, 0), (1, 0)))


def shifted_entropy(logits: Array) -> Array:
  """logits [B, L, V] -> [B, L]: the entropy of the distribution that chose token p sits at p (position 0 = 0),
  aligned with action_mask for an entropy bonus."""
  check_array(logits, "logits", rank=3, dims="[B, L, V]")
  return jnp.pad(entropy_from_logits(logits)[:, :-1], ((0, 0), (1, 0)))
