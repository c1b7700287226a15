"""The optimizer: global-norm clipping, then AdamW with one learning rate for the actor and one for the critic.

The label and weight-decay functions see through `nn.Partitioned` boxes, so the same optimizer initialises on boxed
abstract params (`jax.eval_shape`), where every Adam moment inherits its parameter's logical axes: that is how the
train state's shardings are derived in one pass (`state.state_shardings`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
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


def make_optimizer(optim_config: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (all gradients) -> AdamW with actor_lr / critic_lr by `param_labels`."""

  def adamw(peak):
    return optax.adamw(learning_rate_schedule(optim_config, peak), b1=optim_config.b1, b2=optim_config.b2,
                       eps=optim_config.eps, weight_decay=optim_config.weight_decay, mask=_decay_mask)

  per_label = optax.multi_transform({ACTOR: adamw(optim_config.actor_lr), CRITIC: adamw(optim_config.critic_lr)},
                                    param_labels)
  if optim_config.max_grad_norm is None:
    return per_label
  return optax.chain(optax.clip_by_global_norm(optim_config.max_grad_norm), per_label)
