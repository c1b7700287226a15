"""The optimizer: global-norm clipping, then AdamW with one learning rate for the actor and one for the critic.

The label and weight-decay functions see through `nn.Partitioned` boxes, so the same optimizer initialises on boxed
abstract params (`jax.eval_shape`), where every Adam moment inherits its parameter's logical axes: that is how the
train state's shardings are derived in one pass (`state.state_shardings`).

Precision (`OptimConfig.state_dtype`): optax's Adam keeps its second moment, and computes its step, in the params'
dtype (`mu_dtype` covers only the first moment). In bfloat16 (8 significant bits) the second moment stalls: b2 = 0.999
rounds to 1, so nu never decays, and its increment 1e-3 g^2 is below half an ulp of nu (2^-9 nu to 2^-8 nu) unless
g^2 exceeds 2-4 nu, so nu only ratchets up. `with_state_dtype` runs the whole chain (clipping included) on float32
casts of the gradients and params, so both moments and the step are float32 and the step is rounded to the param
dtype once, by `optax.apply_updates`. On float32 params every cast is skipped: the default program is unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from stepjax.train.config import OptimConfig

ACTOR, CRITIC = "actor", "critic"


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def learning_rate_schedule(optim_config: OptimConfig, peak: float) -> optax.Schedule:
  """The configured schedule shape with peak learning rate `peak`: optimizer step -> learning rate."""
  warmup = optim_config.warmup_steps
  if optim_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, optim_config.total_steps, end_value=0.0)
  if optim_config.schedule == "warmup_constant" and warmup > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  return optax.constant_schedule(peak)


def param_labels(params: dict) -> dict:
  """"critic" for the value head inside the policy and for a separate critic, "actor" for everything else."""

  def label(path, _):
    keys = [getattr(entry, "key", None) for entry in path]
    return CRITIC if keys[:1] == [CRITIC] or keys[:2] == ["policy", "value_head"] else ACTOR

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def _decay_mask(params: dict) -> dict:
  return jax.tree.map(lambda p: nn.meta.unbox(p).ndim >= 2, params, is_leaf=_is_box)


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` run on `dtype` casts of the gradients and params: its state (Adam moments) is created in `dtype` and
  its updates come out in `dtype` (`optax.apply_updates` rounds them to each param's dtype when adding). dtype None
  returns `inner` itself. Leaves already in `dtype` are passed through untouched (no convert op is traced), and
  `nn.Partitioned` boxes are kept, so moments of boxed abstract params still carry their logical axes."""
  if dtype is None:
    return inner
  dtype = jnp.dtype(dtype)

  def cast(tree):
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), tree)

  def init(params):
    return inner.init(cast(params))

  def update(updates, state, params=None):
    return inner.update(cast(updates), state, None if params is None else cast(params))

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (all gradients) -> AdamW with actor_lr / critic_lr by `param_labels`, computed in
  `optim_config.state_dtype` (float32 by default; None: the params' dtype)."""

  def adamw(peak):
    return optax.adamw(learning_rate_schedule(optim_config, peak), b1=optim_config.b1, b2=optim_config.b2,
                       eps=optim_config.eps, weight_decay=optim_config.weight_decay, mask=_decay_mask)

  per_label = optax.multi_transform({ACTOR: adamw(optim_config.actor_lr), CRITIC: adamw(optim_config.critic_lr)},
                                    param_labels)
  if optim_config.max_grad_norm is not None:
    per_label = optax.chain(optax.clip_by_global_norm(optim_config.max_grad_norm), per_label)
  return with_state_dtype(per_label, optim_config.state_dtype)
