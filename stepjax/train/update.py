"""The RL update over packed episodes: `make_update(...) -> update(state, batch)`.

One call (B episodes, L tokens, S step slots, E epochs, M minibatches) runs two jitted programs:

  prepare   one packed forward per row with the current critic (value head or separate critic) gives position
            values [B, L], and with a KL term one with the frozen reference policy gives reference log-probs [B, L]
            (both in M chunks of B / M rows, so memory stays bounded like a minibatch); then
            `credit.compute_advantages` over the whole batch (whitening statistics are batch-wide);
  optimize  a `lax.scan` over E x M shuffled minibatches, one AdamW step each on
              loss = policy_loss + value_coef * value_loss + kl_coef * KL - entropy_coef * entropy,
            where a minibatch whose loss or gradient is not finite leaves params and optimizer state untouched and
            is counted. It depends on the estimator only through its critic level (`UpdateConfig.loss_side`).

Non-finite inputs (drills/poison.py): nothing before the guard raises, and one loss (policy + critic + KL) means one
decision per minibatch step, so a skipped step changes no param, Adam moment or count, the critic's included. A NaN
or Inf reward makes its step's advantage and return NaN; batch-wide whitening spreads the NaN to every advantage, so
every minibatch step is skipped and the update is never half-applied. Without whitening (e.g. Dr.GRPO, unwhitened
GAE) only the minibatch steps holding the episode (or its group) are skipped, and the others apply. A NaN activation
in a row (e.g. a NaN embedding row) spreads to the whole row even from its padding (a masked key's probability is 0,
and 0 x NaN = NaN). A finite loss whose gradient norm overflows float32 (a reward of 1e30 under Dr.GRPO) is skipped
too: the guard reads the gradient, not only the loss.

Both programs are cached on (`StateSpec`, config), so calling `make_update` again with equal configs compiles
nothing, and a sweep over estimators of one critic level compiles `optimize` once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from stepjax import credit as credit_lib
from stepjax import losses
from stepjax import segments
from stepjax import sharding as sharding_lib
from stepjax.models.transformer import Transformer
from stepjax.models.value import build_models
from stepjax.train.config import LossSide, OptimConfig, UpdateConfig, check_update_batch
from stepjax.train.optim import CRITIC, learning_rate_schedule, make_optimizer
from stepjax.train.state import StateSpec, TrainState, raw_key, state_shardings
from stepjax.types import EpisodeBatch

Array = Any

# Per critic level: where the value head is read for the value targets, and the value loss on that read-out. An
# estimator only names its level (`credit.register_estimator(..., critic=...)`); nothing here changes for it.
CRITIC_READOUT: dict[str, tuple[Callable, Callable]] = {
    "step": (EpisodeBatch.step_values, losses.step_value_loss),
    "token": (EpisodeBatch.token_values, losses.token_value_loss),
}


# ------------------------------------------------------------------------------------------------------
# One optimizer step with a non-finite guard (shared by the RL and SFT updates).
# ------------------------------------------------------------------------------------------------------


def guarded_step(tx, loss_fn, params, opt_state, data):
  """One optimizer step; a non-finite loss or gradient leaves params and opt_state exactly as they were.

  The gradient counts as non-finite when its global norm is (any NaN or inf element makes it so; so does a norm
  that overflows float32, a gradient that clipping could not rescue either). Returns (params, opt_state,
  finite [] bool, loss [], grad_norm [], aux metrics).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, data)
  # Measured in float32 whatever the params' dtype (a bfloat16 sum of squares keeps 3 significant digits).
  grad_norm = optax.global_norm(jax.tree.map(lambda g: g if g.dtype == jnp.float32 else g.astype(jnp.float32), grads))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(operands):
    grads, params, opt_state = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def skip(operands):
    _, params, opt_state = operands
    return params, opt_state

  # A cond rather than a select: a skipped step does no optimizer work and keeps every bit of the old state.
  params, opt_state = jax.lax.cond(finite, apply, skip, (grads, params, opt_state))
  return params, opt_state, finite, loss, grad_norm, aux


def as_float32(metrics: dict) -> dict:
  return {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


def _reduce_metrics(per_step: dict) -> dict:
  """Scan outputs [E * M] -> scalars: min / max for extremes, mean otherwise."""
  out = {}
  for name, values in per_step.items():
    if name.endswith("_min"):
      out[name] = jnp.min(values)
    elif name.endswith("_max"):
      out[name] = jnp.max(values)
    else:
      out[name] = jnp.mean(values.astype(jnp.float32))
  return out


def check_halt(metrics: Mapping[str, Any], update_config: UpdateConfig | bool, *, field: str = "update",
               flag: str | None = None) -> None:
  """Host side, after an update (or a chunk of them: `skipped` of any shape is summed): with halt_on_nonfinite
  (the config's, or a bool), raise one line if any minibatch step had a non-finite loss or gradient. field, flag:
  the names in the line (SFT: field="sft", flag="train.halt_on_nonfinite")."""
  halt = update_config if isinstance(update_config, (bool, np.bool_)) else update_config.halt_on_nonfinite
  if halt:
    skipped = int(np.sum(np.asarray(metrics["skipped"])))
    if skipped:
      raise FloatingPointError(f"{field}: {skipped} minibatch update(s) had a non-finite loss or gradient and were "
                               f"skipped ({flag or field + '.halt_on_nonfinite'}=True)")


# ------------------------------------------------------------------------------------------------------
# prepare: critic values, reference log-probs, credit.
# ------------------------------------------------------------------------------------------------------


@struct.dataclass
class LearnerData:
  """What the minibatch loss reads per row (B rows; None where the config does not need it).

  batch: the EpisodeBatch [B, L] (its logprobs are those of the policy that acted).
  advantages: [B, L] per-token advantages (`credit.Credit.token_advantages`).
  returns: value targets, [B, S] for a step critic, [B, L] for a token critic.
  old_values: the values the advantages were computed with (value clipping), shaped like returns.
  ref_logprobs: [B, L] the reference policy's log-probs (KL term).
  """

  batch: EpisodeBatch
  advantages: Array
  returns: Array | None = None
  old_values: Array | None = None
  ref_logprobs: Array | None = None


def _strided_chunks(x: Array, chunks: int) -> Array:
  """[B, ...] -> [chunks, B / chunks, ...], chunk c = rows c, c + chunks, ...: with the batch split over devices in
  contiguous blocks, every chunk spans all devices evenly and no row moves."""
  return jnp.swapaxes(x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:]), 0, 1)


def _unchunk(x: Array) -> Array:
  """Inverse of `_strided_chunks`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _constrain_rows(tree):
  """Rows over the batch axes (`activation_batch`) under the active logical rules; a no-op without them. Keeps the
  partitioner from replicating a gathered minibatch."""
  return jax.tree.map(lambda x: nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1)), tree)


def _head_values(module, tokens):
  """PolicyWithValue without its LM head: tokens [B, L] -> values [B, L] (targets need no logits)."""
  hidden, _ = module.trunk(tokens)
  return module.value_head(hidden)


def _prepare(spec: StateSpec, credit_config: credit_lib.CreditConfig, chunks: int, params: dict,
             ref_params: dict | None, batch: EpisodeBatch) -> tuple[LearnerData, dict]:
  """Critic values and reference log-probs (one packed forward per row, in `chunks` chunks of rows so memory is
  bounded like a minibatch), then credit assignment over the whole batch."""
  policy_module, critic_module = build_models(spec.model, spec.value)
  critic = credit_lib.critic_level(credit_config.estimator)
  kind = spec.value.kind

  def targets(tokens):
    out = {}
    if kind == "head":
      out["values"] = policy_module.apply({"params": params["policy"]}, tokens, method=_head_values)
    elif kind == "separate":
      out["values"] = critic_module.apply({"params": params[CRITIC]}, tokens)[0]
    if spec.with_ref:
      ref_logits, _, _ = Transformer(spec.model).apply({"params": ref_params}, tokens)
      out["ref_logprobs"] = losses.shifted_logprobs(ref_logits, tokens)
    return out

  chunked = jax.lax.map(targets, _strided_chunks(batch.tokens, chunks)) if (critic or spec.with_ref) else {}
  out = {name: _unchunk(value) for name, value in chunked.items()}
  position_values = out.get("values")
  credit = credit_lib.compute_advantages(credit_config, batch, position_values)
  old_values = None if critic is None else CRITIC_READOUT[critic][0](batch, position_values)
  data = LearnerData(batch=batch, advantages=credit.token_advantages, returns=credit.returns, old_values=old_values,
                     ref_logprobs=out.get("ref_logprobs"))
  return data, _credit_diagnostics(batch, credit, position_values, critic)


# Per-step-index advantage statistics are reported for the first few step slots only.
DIAGNOSTIC_STEPS = 6


def _credit_diagnostics(batch: EpisodeBatch, credit: credit_lib.Credit, position_values: Array | None,
                        critic: str | None) -> dict:
  """Why one credit level beats another, as scalars per update:

  advantage_mean / _std        over action tokens (what the policy loss sees);
  step_advantage_mean / _std   over valid steps (`Credit.step_advantages`: the step's advantage, or for token-level
                               estimators the mean over its tokens);
  adv_step{t}_mean / _std      the same at step index t < DIAGNOSTIC_STEPS, over the episodes that have step t;
  critic_ev_steps / _tokens    with a critic: the explained variance of its values against the undiscounted Monte
                               Carlo return-to-go, read at step boundaries (step_start - 1) and before every action
                               token, whatever level the estimator reads it at, so step and token critics compare.
  """
  out = {}
  out["advantage_mean"], out["advantage_std"] = segments.masked_stats(credit.token_advantages, batch.action_mask)
  out["step_advantage_mean"], out["step_advantage_std"] = segments.masked_stats(credit.step_advantages,
                                                                                batch.step_mask)
  for t in range(min(batch.max_steps, DIAGNOSTIC_STEPS)):  # a few static slots, not a loop over time
    out[f"adv_step{t}_mean"], out[f"adv_step{t}_std"] = segments.masked_stats(credit.step_advantages[:, t],
                                                                              batch.step_mask[:, t])
  if critic is not None:
    step_to_go = credit_lib.discounted_returns(batch.step_rewards, batch.step_mask, gamma=1.0)
    token_to_go = credit_lib.discounted_returns(batch.token_rewards(), batch.action_mask, gamma=1.0)
    out["critic_ev_steps"] = segments.explained_variance(batch.step_values(position_values), step_to_go,
                                                         batch.step_mask)
    out["critic_ev_tokens"] = segments.explained_variance(batch.token_values(position_values), token_to_go,
                                                          batch.action_mask)
  return out


# ------------------------------------------------------------------------------------------------------
# optimize: epochs x shuffled minibatches.
# ------------------------------------------------------------------------------------------------------


def _optimize(spec: StateSpec, side: LossSide, state: TrainState, data: LearnerData) -> tuple[TrainState, dict]:
  """Epochs x shuffled minibatches, one guarded optimizer step each."""
  policy_module, critic_module = build_models(spec.model, side.value)
  tx = make_optimizer(spec.optim)
  kind, critic = side.value.kind, side.critic
  epochs, minibatches = side.epochs, side.minibatches
  batch_size = data.batch.batch_size

  def forward(params, tokens):
    """tokens [b, L] -> (logits [b, L, V], position values [b, L] or None)."""
    if kind == "head":
      logits, values, _, _ = policy_module.apply({"params": params["policy"]}, tokens)
      return logits, values
    logits, _, _ = policy_module.apply({"params": params["policy"]}, tokens)
    values = critic_module.apply({"params": params[CRITIC]}, tokens)[0] if kind == "separate" else None
    return logits, values

  def loss_fn(params, data: LearnerData):
    batch = data.batch
    logits, values = forward(params, batch.tokens)
    logp = losses.shifted_logprobs(logits, batch.tokens)
    policy, metrics = losses.policy_loss(side.policy_loss, logp, batch.logprobs, data.advantages,
                                         batch.action_mask, batch.step_ids, batch.step_mask)
    total = policy
    metrics = {"policy_loss": policy, **metrics}
    if critic is not None:
      value, value_metrics = CRITIC_READOUT[critic][1](batch, values, data.returns, old_values=data.old_values,
                                                       clip_eps=side.value_clip)
      total = total + side.value_coef * value
      metrics.update(value_loss=value, **value_metrics)
    # The entropy is always reported, but differentiated only when it is part of the loss.
    entropy_logits = logits if side.entropy_coef else jax.lax.stop_gradient(logits)
    entropy = losses.aggregate(losses.shifted_entropy(entropy_logits), batch.action_mask, mode="token-mean")
    total = total - side.entropy_coef * entropy
    metrics["entropy"] = jax.lax.stop_gradient(entropy)
    if side.kl_coef > 0:
      kl, kl_metrics = losses.kl_loss(logp, data.ref_logprobs, batch.action_mask, batch.step_ids, batch.step_mask,
                                      kind=side.kl_kind, agg_mode=side.policy_loss.agg_mode)
      total = total + side.kl_coef * kl
      metrics.update(kl_metrics)
    return total, metrics

  rng, shuffle_key = jax.random.split(state.key)
  if minibatches == 1:
    row_order = None  # the minibatch is the whole batch: a shuffle would only change the summation order
  else:
    perms = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(jax.random.split(shuffle_key, epochs))
    row_order = perms.reshape(epochs * minibatches, batch_size // minibatches)

  def minibatch_step(carry, rows):
    params, opt_state = carry
    minibatch = data if rows is None else _constrain_rows(jax.tree.map(lambda x: x[rows], data))
    params, opt_state, finite, loss, grad_norm, metrics = guarded_step(tx, loss_fn, params, opt_state, minibatch)
    metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return (params, opt_state), metrics

  (params, opt_state), per_step = jax.lax.scan(minibatch_step, (state.params, state.opt_state), row_order,
                                               length=epochs * minibatches)
  skipped = jnp.sum(per_step.pop("skipped")).astype(jnp.int32)
  metrics = _reduce_metrics(per_step)
  skipped_updates = state.skipped_updates + skipped
  # Skipped steps leave the optimizer's step counter alone, so the schedule sees only applied steps.
  optimizer_steps = (state.step + 1) * epochs * minibatches - skipped_updates
  metrics.update(skipped=skipped, skipped_updates=skipped_updates,
                 actor_lr=learning_rate_schedule(spec.optim, spec.optim.actor_lr)(optimizer_steps),
                 critic_lr=learning_rate_schedule(spec.optim, spec.optim.critic_lr)(optimizer_steps))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=raw_key(rng),
                            skipped_updates=skipped_updates)
  return new_state, as_float32(metrics)


# ------------------------------------------------------------------------------------------------------
# The public update.
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _prepare_program(spec: StateSpec, credit_config: credit_lib.CreditConfig, chunks: int) -> Callable:
  fn = functools.partial(_prepare, spec, credit_config, chunks)
  if spec.mesh is None:
    return spec.jit(fn)
  shardings = state_shardings(spec)
  return spec.jit(fn, in_shardings=(shardings.params, shardings.ref_params, spec.rows()),
                  out_shardings=(spec.rows(), spec.replicated()))


@functools.lru_cache(maxsize=64)
def _optimize_program(spec: StateSpec, side: LossSide) -> Callable:
  fn = functools.partial(_optimize, spec, side)
  if spec.mesh is None:
    return spec.jit(fn, donate_argnums=0)
  shardings = state_shardings(spec)
  return spec.jit(fn, in_shardings=(shardings, spec.rows()), out_shardings=(shardings, spec.replicated()),
                  donate_argnums=0)


def make_update(model_config, update_config: UpdateConfig, optim_config: OptimConfig, *, mesh=None, rules=None,
                compiler_options: Mapping[str, Any] | None = None
                ) -> Callable[[TrainState, EpisodeBatch], tuple[TrainState, dict]]:
  """-> `update(state, batch) -> (state, metrics)`; the state is donated (use the returned one).

  batch: an EpisodeBatch [B, L] (host numpy or device arrays) whose `logprobs` are those of the policy that acted.

  metrics (float32 scalars; means over the E x M minibatch steps unless the name ends in _min / _max):
    loss, policy_loss, clip_frac (+ _low / _high), dual_clip_frac, approx_kl, log_ratio_clamp_frac,
    ratio_mean / _min / _max, entropy; with a critic: value_loss, vf_clip_frac, explained_variance, value_mean,
    return_mean; with kl_coef > 0: kl, kl_max; the credit diagnostics of `_credit_diagnostics` (advantage
    statistics over tokens, steps and per step index; the critic's explained variance at steps and at tokens),
    grad_norm (before clipping), skipped (minibatch steps skipped in this update for a non-finite loss or
    gradient), skipped_updates (so far), actor_lr / critic_lr (after this update).
  With `mesh` and `rules`: state and batch are first placed in their shardings (a no-op when they already are; the
  batch over data x fsdp) and both programs run under the logical-axis rules. `update.state_shardings` holds the
  state's shardings (None without a mesh). compiler_options: XLA options for both programs (`jax.jit`'s).
  """
  spec = StateSpec.for_update(model_config, update_config, optim_config, mesh=mesh, rules=rules,
                              compiler_options=compiler_options)
  prepare = _prepare_program(spec, update_config.credit, update_config.minibatches)
  optimize = _optimize_program(spec, update_config.loss_side())
  shardings = None if mesh is None else state_shardings(spec)

  def update(state: TrainState, batch: EpisodeBatch) -> tuple[TrainState, dict]:
    check_update_batch(update_config, batch.batch_size, mesh)  # before anything compiles
    if mesh is not None:
      state = jax.device_put(state, shardings)
      batch = jax.device_put(batch, sharding_lib.batch_shardings(batch, mesh))
    data, credit_metrics = prepare(state.params, state.ref_params, batch)
    state, metrics = optimize(state, data)
    return state, {**metrics, **credit_metrics}

  update.state_shardings = shardings
  return update


def update_step(spec: StateSpec, update_config: UpdateConfig, state: TrainState,
                batch: EpisodeBatch) -> tuple[TrainState, dict]:
  """The un-jitted update (prepare, then optimize) for use inside a larger traced program (`loop`)."""
  data, credit_metrics = _prepare(spec, update_config.credit, update_config.minibatches, state.params,
                                  state.ref_params, batch)
  state, metrics = _optimize(spec, update_config.loss_side(), state, data)
  return state, {**metrics, **credit_metrics}

