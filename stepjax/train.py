"""The learner: train state, the jitted PPO-style update over packed episodes, SFT warm start and checkpoints.

One `update(state, batch)` call (B episodes, L tokens, S step slots, E epochs, M minibatches) runs two jitted
programs:

  prepare   one packed forward per row with the current critic (value head or separate critic) gives position
            values [B, L], and with kl_coef > 0 one with the frozen reference policy gives reference log-probs
            [B, L] (both in M chunks of B / M rows, so memory stays bounded like a minibatch); then
            `credit.compute_advantages` over the whole batch: per-token advantages and value targets (step critic:
            V(s_t) read at step_start - 1; token critic: the value before each action token);
  optimize  a `lax.scan` over E x M shuffled minibatches, one AdamW step each on
              loss = policy_loss + value_coef * value_loss + kl_coef * KL - entropy_coef * entropy,
            where a minibatch whose loss or gradient is not finite leaves params and optimizer state untouched and
            is counted. It depends on the estimator only through its critic level, so a sweep over critic-free
            estimators compiles it once.

Param tree of a `TrainState` per `ValueConfig.kind`:

    "head":      params = {"policy": Transformer tree + value_head/{kernel [D], bias []}}
    "separate":  params = {"policy": Transformer tree, "critic": Critic tree (no lm_head) + value_head}
    None:        params = {"policy": Transformer tree}

The optimizer labels `policy/value_head` and everything under `critic` as "critic" (critic_lr), the rest as
"actor" (actor_lr): one optax chain = global-norm clipping over all gradients, then AdamW per label.

Whole runs, PureJaxRL-style: `make_train_iteration` (rollout with the current policy, then the update above, as one
pure function), `make_train(...) -> train(key, env_params, policy_params)` (init + a `lax.scan` over iterations; jit
once, vmap over seeds), `make_sft_train` (the SFT warm start the same way), `make_evaluate` (held-out episodes,
greedy and sampled) and `make_host_train_iteration` (host environments: a Python loop around the same pieces).

Checkpoints are orbax `CheckpointManager` directories (asynchronous, keep-last-k, atomic: orbax writes
`<step>.orbax-checkpoint-tmp*` and renames it when complete, so a save killed mid-write is never restored).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from stepjax import credit as credit_lib
from stepjax import losses
from stepjax import rollout as rollout_lib
from stepjax import sharding as sharding_lib
from stepjax.models.transformer import ModelConfig, Transformer
from stepjax.models.value import ValueConfig, build_models, init_models
from stepjax.types import EpisodeBatch

Array = Any

SCHEDULES = ("constant", "warmup_constant", "cosine")
ACTOR, CRITIC = "actor", "critic"


def _fail(field: str, message: str):
  raise ValueError(f"{field}: {message}")


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(x, field: str, ok: Callable[[float], bool], allowed: str, optional: bool = False) -> None:
  if optional and x is None:
    return
  if not _is_number(x) or not ok(float(x)):
    _fail(field, f"must be {allowed}{' or None' if optional else ''}, got {x!r}")


def _check_int(x, field: str, minimum: int) -> None:
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
    _fail(field, f"must be an int >= {minimum}, got {x!r}")


def _check_mesh_args(mesh, rules) -> None:
  if (mesh is None) != (rules is None):
    _fail("rules" if rules is None else "mesh", "pass mesh and rules together")


# ------------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping and one schedule shape for two peak learning rates (actor and critic).

  schedule: "constant"; "warmup_constant" (linear 0 -> lr over warmup_steps, then lr); "cosine" (linear warmup,
    then cosine decay to 0 at total_steps). Steps count optimizer steps (epochs x minibatches per update), and
    a skipped (non-finite) minibatch does not advance them.
  weight_decay: decoupled, applied to matrices only (kernels, embeddings; not norms, biases or the value head).
  max_grad_norm: clip the global norm of all gradients (actor and critic together); None disables clipping.
  """

  actor_lr: float = 1e-6
  critic_lr: float = 1e-5
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int | None = None

  def __post_init__(self):
    self.validate()

  def validate(self) -> "OptimConfig":
    _check_number(self.actor_lr, "optim.actor_lr", lambda v: v >= 0, ">= 0")
    _check_number(self.critic_lr, "optim.critic_lr", lambda v: v >= 0, ">= 0")
    _check_number(self.weight_decay, "optim.weight_decay", lambda v: v >= 0, ">= 0")
    _check_number(self.b1, "optim.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    _check_number(self.b2, "optim.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    _check_number(self.eps, "optim.eps", lambda v: v > 0, "> 0")
    _check_number(self.max_grad_norm, "optim.max_grad_norm", lambda v: v > 0, "> 0", optional=True)
    if self.schedule not in SCHEDULES:
      _fail("optim.schedule", f"unknown {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    _check_int(self.warmup_steps, "optim.warmup_steps", 0)
    if self.schedule == "cosine":
      if self.total_steps is None:
        _fail("optim.total_steps", "required by schedule 'cosine' (the step where the learning rate reaches 0)")
      _check_int(self.total_steps, "optim.total_steps", self.warmup_steps + 1)
    elif self.total_steps is not None:
      _check_int(self.total_steps, "optim.total_steps", 1)
    return self


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """What one `update` optimizes.

  credit: the advantage estimator (`credit.CreditConfig`). policy_loss: `losses.PolicyLossConfig` (its agg_mode
    also aggregates the KL term). value: `ValueConfig`; kind must be "head" or "separate" for a critic estimator
    (step_gae, token_gae) and None for the critic-free ones (a value head would get no loss).
  value_coef: weight of the value loss (step-level for step_gae, token-level for token_gae).
  value_clip: PPO value clipping around the values the advantages were computed with; None disables it.
  kl_coef, kl_kind: KL to the frozen reference policy (`losses.KL_KINDS`); kl_coef = 0 keeps no reference.
  entropy_coef: weight of the entropy bonus (the mean entropy over action tokens is subtracted from the loss).
  epochs x minibatches: optimizer steps per update; minibatches must divide the batch size.
  halt_on_nonfinite: `check_halt` raises when a minibatch was skipped for a non-finite loss or gradient.
  """

  credit: credit_lib.CreditConfig = dataclasses.field(default_factory=credit_lib.CreditConfig)
  policy_loss: losses.PolicyLossConfig = dataclasses.field(default_factory=losses.PolicyLossConfig)
  value: ValueConfig = dataclasses.field(default_factory=ValueConfig)
  value_coef: float = 0.5
  value_clip: float | None = None
  kl_coef: float = 0.0
  kl_kind: str = "low_var_kl"
  entropy_coef: float = 0.0
  epochs: int = 1
  minibatches: int = 1
  halt_on_nonfinite: bool = False

  def __post_init__(self):
    self.validate()

  @property
  def critic(self) -> str | None:
    """"step", "token" or None: the level the estimator reads the critic at."""
    return credit_lib.critic_level(self.credit.estimator)

  def validate(self) -> "UpdateConfig":
    if not isinstance(self.credit, credit_lib.CreditConfig):
      _fail("update.credit", f"expected a CreditConfig, got {type(self.credit).__name__}")
    if not isinstance(self.policy_loss, losses.PolicyLossConfig):
      _fail("update.policy_loss", f"expected a PolicyLossConfig, got {type(self.policy_loss).__name__}")
    if not isinstance(self.value, ValueConfig):
      _fail("update.value", f"expected a ValueConfig, got {type(self.value).__name__}")
    for name, config in (("policy_loss", self.policy_loss), ("value", self.value)):
      try:
        config.validate()
      except ValueError as error:  # their messages name the field inside the sub-config
        raise ValueError(f"update.{name}.{error}") from None
    estimator = self.credit.estimator
    if self.critic is not None and self.value.kind is None:
      _fail("update.value.kind", f"estimator {estimator!r} reads a critic; use 'head' or 'separate', not None")
    if self.critic is None and self.value.kind is not None:
      _fail("update.value.kind", f"estimator {estimator!r} reads no critic, so a {self.value.kind!r} critic would "
            "get no loss; use None")
    _check_number(self.value_coef, "update.value_coef", lambda v: v >= 0, ">= 0")
    _check_number(self.value_clip, "update.value_clip", lambda v: v >= 0, ">= 0", optional=True)
    _check_number(self.kl_coef, "update.kl_coef", lambda v: v >= 0, ">= 0")
    if self.kl_kind not in losses.KL_KINDS:
      _fail("update.kl_kind", f"unknown {self.kl_kind!r}; allowed: {', '.join(losses.KL_KINDS)}")
    _check_number(self.entropy_coef, "update.entropy_coef", lambda v: True, "a finite number")
    _check_int(self.epochs, "update.epochs", 1)
    _check_int(self.minibatches, "update.minibatches", 1)
    if not isinstance(self.halt_on_nonfinite, bool):
      _fail("update.halt_on_nonfinite", f"must be a bool, got {self.halt_on_nonfinite!r}")
    return self


def check_update_batch(update_config: UpdateConfig, batch_size: int, mesh=None) -> None:
  """Batch-shape checks that need the batch: one clear line before anything compiles."""
  minibatches = update_config.minibatches
  if batch_size % minibatches:
    _fail("update.minibatches", f"{minibatches} does not divide the batch size {batch_size}")
  if mesh is not None:
    sharding_lib.check_batch_divisible(batch_size, mesh, "batch_size")
    # Each minibatch is split over the data axes too.
    sharding_lib.check_batch_divisible(batch_size // minibatches, mesh,
                                       f"update.minibatches: the minibatch size (batch {batch_size} / {minibatches})")


# ------------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------------


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

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: dict) -> dict:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


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


# ------------------------------------------------------------------------------------------------------
# Train state.
# ------------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-identically.

  step: [] int32, number of `update` calls so far.
  params: {"policy": ..., "critic": ... (kind "separate" only)}; see the module docstring.
  opt_state: the `make_optimizer` state of `params`.
  ref_params: frozen Transformer params of the reference policy (no value head), or None when kl_coef == 0.
  rng: [2] uint32 raw key data (`jax.random.key_data`), so checkpoints hold a plain array.
  skipped_updates: [] int32, minibatch updates skipped so far for a non-finite loss or gradient.
  """

  step: Array
  params: dict
  opt_state: Any
  ref_params: dict | None
  rng: Array
  skipped_updates: Array

  @property
  def key(self) -> Array:
    return jax.random.wrap_key_data(self.rng)


def _raw_key(key: Array) -> Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def _policy_trunk(policy_params: dict) -> dict:
  """Transformer params of a policy tree (the value head, if any, dropped)."""
  return {k: v for k, v in policy_params.items() if k != "value_head"}


def _boxed_params(module: nn.Module) -> dict:
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def _dict_key_suffix(path) -> tuple:
  """The trailing run of dict keys of a key path: a param's own path inside any optimizer-state subtree."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(entry.key)
  return tuple(reversed(keys))


def _like_params(abstract_opt_state, param_shardings, default):
  """Shardings for an optimizer state: every copy of a param (Adam's mu, nu) is sharded like the param; counts and
  other non-param leaves get `default`. (optax.tree_map_params cannot see through multi_transform's masked nodes.)"""
  by_path = {_dict_key_suffix(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
  return jax.tree_util.tree_map_with_path(lambda path, _: by_path.get(_dict_key_suffix(path), default),
                                          abstract_opt_state)


@functools.lru_cache(maxsize=64)
def _param_shardings(model_config: ModelConfig, value_config: ValueConfig, mesh, rules) -> tuple[dict, dict]:
  """(NamedShardings, abstract unboxed params) of `params` from the modules' logical axes (nothing allocated)."""
  policy_module, critic_module = build_models(model_config, value_config)
  boxed = {"policy": _boxed_params(policy_module)}
  if critic_module is not None:
    boxed[CRITIC] = _boxed_params(critic_module)
  return sharding_lib.shardings_from_logical(sharding_lib.logical_specs(boxed), mesh, rules), nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=64)
def _state_shardings(model_config: ModelConfig, value_config: ValueConfig, with_ref: bool,
                     optim_config: OptimConfig, mesh, rules) -> TrainState:
  """NamedShardings of a TrainState from the modules' logical axes (`jax.eval_shape`, nothing allocated)."""
  param_shardings, abstract_params = _param_shardings(model_config, value_config, mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  abstract_opt_state = jax.eval_shape(make_optimizer(optim_config).init, abstract_params)
  return TrainState(step=replicated, params=param_shardings,
                    opt_state=_like_params(abstract_opt_state, param_shardings, replicated),
                    ref_params=_policy_trunk(param_shardings["policy"]) if with_ref else None,
                    rng=replicated, skipped_updates=replicated)


@functools.lru_cache(maxsize=64)
def _init_program(model_config, value_config, with_ref, optim_config, mesh, rules):
  """Jitted (params, raw rng) -> fresh TrainState (optimizer state, reference copy), in its shardings on a mesh."""
  tx = make_optimizer(optim_config)

  def finish(params, rng):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       ref_params=_policy_trunk(params["policy"]) if with_ref else None, rng=rng,
                       skipped_updates=jnp.zeros((), jnp.int32))
    # Fresh buffers everywhere: the reference must not alias the policy (nor the caller's arrays), since the
    # update donates the whole state.
    return jax.tree.map(jnp.copy, state)

  if mesh is None:
    # Committed to one device, like a restored checkpoint, so both hit the same compiled update.
    return jax.jit(finish, out_shardings=_default_sharding())
  shardings = _state_shardings(model_config, value_config, with_ref, optim_config, mesh, rules)
  return sharding_lib.jit_with_rules(finish, mesh, rules, out_shardings=shardings)


def _default_sharding() -> SingleDeviceSharding:
  """Where a state without a mesh lives: the first device (committed)."""
  return SingleDeviceSharding(jax.devices()[0])


def _init_state(model_config, value_config, with_ref, optim_config, key, policy_params, mesh, rules) -> TrainState:
  model_config.validate()
  _check_mesh_args(mesh, rules)
  key = jax.random.key(key) if isinstance(key, int) else key
  trunk_key, init_key, rng = jax.random.split(key, 3)
  if policy_params is None and mesh is not None:
    # Each device materialises only its own shard of the random trunk.
    trunk = Transformer(model_config)
    policy_params, _ = sharding_lib.sharded_init(
        lambda k: trunk.init(k, jnp.zeros((1, 1), jnp.int32))["params"], mesh, rules, trunk_key)
  # init_models jits (and caches per module) the random init, so repeated calls compile it once.
  policy, critic = init_models(model_config, value_config, init_key, policy_params)
  params = {"policy": policy} if critic is None else {"policy": policy, CRITIC: critic}
  finish = _init_program(model_config, value_config, with_ref, optim_config, mesh, rules)
  return finish(params, _raw_key(rng))


def init_train_state(model_config: ModelConfig, update_config: UpdateConfig, optim_config: OptimConfig, key: Array,
                     policy_params: dict | None = None, *, mesh=None, rules=None) -> TrainState:
  """A fresh TrainState. policy_params: Transformer params to start from (HF checkpoint, SFT), else random.

  With `mesh` and `rules` every array is created directly in its sharding (`train_state_shardings`).
  """
  return _init_state(model_config, update_config.value, update_config.kl_coef > 0, optim_config, key, policy_params,
                     mesh, rules)


def train_state_shardings(model_config: ModelConfig, update_config: UpdateConfig, optim_config: OptimConfig, mesh,
                          rules) -> TrainState:
  """A TrainState of NamedShardings under the logical-axis `rules` (parameters, Adam moments, reference)."""
  return _state_shardings(model_config, update_config.value, update_config.kl_coef > 0, optim_config, mesh, rules)


# ------------------------------------------------------------------------------------------------------
# One optimizer step with a non-finite guard (shared by RL and SFT updates).
# ------------------------------------------------------------------------------------------------------


def _guarded_step(tx, loss_fn, params, opt_state, data):
  """One optimizer step; a non-finite loss or gradient leaves params and opt_state exactly as they were.

  The gradient counts as non-finite when its global norm is (any NaN or inf element makes it so; so does a norm
  that overflows float32, a gradient that clipping could not rescue either). Returns (params, opt_state,
  finite [] bool, loss [], grad_norm [], aux metrics).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, data)
  grad_norm = optax.global_norm(grads)
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


def check_halt(metrics: Mapping[str, Any], update_config: UpdateConfig) -> None:
  """Host side, after an update: with halt_on_nonfinite, raise if any minibatch had a non-finite loss or grad."""
  if update_config.halt_on_nonfinite:
    skipped = int(np.asarray(metrics["skipped"]))
    if skipped:
      raise FloatingPointError(f"update: {skipped} minibatch update(s) had a non-finite loss or gradient and were "
                               "skipped (update.halt_on_nonfinite=True)")


# ------------------------------------------------------------------------------------------------------
# The RL update.
# ------------------------------------------------------------------------------------------------------


@struct.dataclass
class _LearnerData:
  """What the minibatch loss reads per row (B rows; None where the config does not need it).

  batch: the EpisodeBatch [B, L] (its logprobs are the behaviour policy's).
  advantages: [B, L] per-token advantages (`credit.Credit.token_advantages`).
  returns: value targets, [B, S] for a step critic, [B, L] for a token critic.
  old_values: the values the advantages were computed with (value clipping), shaped like returns.
  ref_logprobs: [B, L] the reference policy's log-probs (kl_coef > 0).
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


def _constrain_rows(tree):
  """Rows over the batch axes (`activation_batch`) under the active logical rules; a no-op without them. Keeps the
  partitioner from replicating a gathered minibatch."""
  return jax.tree.map(lambda x: nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1)), tree)


def _unchunk(x: Array) -> Array:
  """Inverse of `_strided_chunks`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _head_values(module, tokens):
  """PolicyWithValue without its LM head: tokens [B, L] -> values [B, L] (targets need no logits)."""
  hidden, _ = module.trunk(tokens)
  return module.value_head(hidden)


def _masked_stats(x: Array, mask: Array) -> tuple[Array, Array]:
  mean = losses.masked_mean(x, mask)
  return mean, jnp.sqrt(losses.masked_mean(jnp.square(x - mean), mask))


def _prepare(model_config: ModelConfig, value_kind, credit_config: credit_lib.CreditConfig, with_ref: bool,
             chunks: int, params: dict, ref_params: dict | None, batch: EpisodeBatch) -> tuple[_LearnerData, dict]:
  """Step 1-2 of the update: critic values and reference log-probs (one packed forward per row, in `chunks` chunks
  of rows so memory is bounded like a minibatch), then credit assignment over the whole batch."""
  policy_module, critic_module = build_models(model_config, ValueConfig(kind=value_kind))
  critic = credit_lib.critic_level(credit_config.estimator)

  def targets(tokens):
    out = {}
    if value_kind == "head":
      out["values"] = policy_module.apply({"params": params["policy"]}, tokens, method=_head_values)
    elif value_kind == "separate":
      out["values"] = critic_module.apply({"params": params[CRITIC]}, tokens)[0]
    if with_ref:
      ref_logits, _, _ = Transformer(model_config).apply({"params": ref_params}, tokens)
      out["ref_logprobs"] = losses.shifted_logprobs(ref_logits, tokens)
    return out

  chunked = jax.lax.map(targets, _strided_chunks(batch.tokens, chunks)) if (critic or with_ref) else {}
  out = {name: _unchunk(value) for name, value in chunked.items()}
  position_values = out.get("values")
  # Whitening statistics are batch-wide, so credit runs on the whole batch, not per minibatch.
  credit = credit_lib.compute_advantages(credit_config, batch, position_values)
  old_values = None
  if critic == "step":
    old_values = batch.step_values(position_values)
  elif critic == "token":
    old_values = batch.token_values(position_values)
  data = _LearnerData(batch=batch, advantages=credit.token_advantages, returns=credit.returns, old_values=old_values,
                     ref_logprobs=out.get("ref_logprobs"))
  advantage_mean, advantage_std = _masked_stats(credit.token_advantages, batch.action_mask)
  return data, {"advantage_mean": advantage_mean, "advantage_std": advantage_std}


def _loss_side(config: UpdateConfig) -> UpdateConfig:
  """The part of the config that shapes the optimization program: the estimator matters only through the level it
  reads the critic at, so e.g. every critic-free estimator shares one compiled `_optimize`."""
  canonical = {"step": "step_gae", "token": "token_gae", None: "grpo"}[config.critic]
  return dataclasses.replace(config, credit=credit_lib.CreditConfig(estimator=canonical, whiten=None),
                             halt_on_nonfinite=False)


def _optimize(model_config: ModelConfig, config: UpdateConfig, optim_config: OptimConfig, state: TrainState,
              data: _LearnerData) -> tuple[TrainState, dict]:
  """Step 3-5 of the update: epochs x shuffled minibatches, one guarded optimizer step each."""
  policy_module, critic_module = build_models(model_config, config.value)
  tx = make_optimizer(optim_config)
  kind, critic = config.value.kind, config.critic
  epochs, minibatches = config.epochs, config.minibatches
  batch_size = data.batch.batch_size

  def forward(params, tokens):
    """tokens [b, L] -> (logits [b, L, V], position values [b, L] or None)."""
    if kind == "head":
      logits, values, _, _ = policy_module.apply({"params": params["policy"]}, tokens)
      return logits, values
    logits, _, _ = policy_module.apply({"params": params["policy"]}, tokens)
    values = critic_module.apply({"params": params[CRITIC]}, tokens)[0] if kind == "separate" else None
    return logits, values

  def loss_fn(params, data: _LearnerData):
    batch = data.batch
    logits, values = forward(params, batch.tokens)
    logp = losses.shifted_logprobs(logits, batch.tokens)
    policy, metrics = losses.policy_loss(config.policy_loss, logp, batch.logprobs, data.advantages,
                                         batch.action_mask, batch.step_ids, batch.step_mask)
    total = policy
    metrics = {"policy_loss": policy, **metrics}
    if critic is not None:
      value_loss_fn = losses.step_value_loss if critic == "step" else losses.token_value_loss
      value, value_metrics = value_loss_fn(batch, values, data.returns, old_values=data.old_values,
                                           clip_eps=config.value_clip)
      total = total + config.value_coef * value
      metrics.update(value_loss=value, **value_metrics)
    # The entropy is always reported, but differentiated only when it is part of the loss.
    entropy_logits = logits if config.entropy_coef else jax.lax.stop_gradient(logits)
    entropy = losses.aggregate(losses.shifted_entropy(entropy_logits), batch.action_mask, mode="token-mean")
    total = total - config.entropy_coef * entropy
    metrics["entropy"] = jax.lax.stop_gradient(entropy)
    if config.kl_coef > 0:
      kl, kl_metrics = losses.kl_loss(logp, data.ref_logprobs, batch.action_mask, batch.step_ids, batch.step_mask,
                                      kind=config.kl_kind, agg_mode=config.policy_loss.agg_mode)
      total = total + config.kl_coef * kl
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
    params, opt_state, finite, loss, grad_norm, metrics = _guarded_step(tx, loss_fn, params, opt_state, minibatch)
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
                 actor_lr=learning_rate_schedule(optim_config, optim_config.actor_lr)(optimizer_steps),
                 critic_lr=learning_rate_schedule(optim_config, optim_config.critic_lr)(optimizer_steps))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=_raw_key(rng),
                            skipped_updates=skipped_updates)
  return new_state, _as_float32(metrics)


def _as_float32(metrics: dict) -> dict:
  return {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


def _rows(mesh):
  """One sharding for any batch-major tree: the leading (row) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))


# Compiled programs are cached on their (hashable) configs, so that repeated `make_update` calls, and estimators
# sharing one `_loss_side`, reuse them.
def _options_key(compiler_options: Mapping[str, Any] | None) -> tuple:
  """A hashable form of XLA compiler options (the program caches key on it)."""
  if compiler_options is None:
    return ()
  if not isinstance(compiler_options, Mapping):
    _fail("compiler_options", f"expected a mapping of XLA option names to values, got "
          f"{type(compiler_options).__name__}")
  return tuple(sorted(compiler_options.items()))


def _jit(fn, mesh, rules, options: tuple, in_shardings=None, out_shardings=None, donate_argnums=()):
  """`jax.jit` without a mesh; `sharding.jit_with_rules` with explicit in / out shardings on one."""
  compiler_options = dict(options) or None
  if mesh is None:
    return jax.jit(fn, donate_argnums=donate_argnums, compiler_options=compiler_options)
  return sharding_lib.jit_with_rules(fn, mesh, rules, in_shardings=in_shardings, out_shardings=out_shardings,
                                     donate_argnums=donate_argnums, compiler_options=compiler_options)


@functools.lru_cache(maxsize=64)
def _prepare_program(model_config, value_config, credit_config, with_ref, chunks, mesh, rules, options):
  fn = functools.partial(_prepare, model_config, value_config.kind, credit_config, with_ref, chunks)
  if mesh is None:
    return _jit(fn, None, None, options)
  param_shardings, _ = _param_shardings(model_config, value_config, mesh, rules)
  ref_shardings = _policy_trunk(param_shardings["policy"]) if with_ref else None
  return _jit(fn, mesh, rules, options, in_shardings=(param_shardings, ref_shardings, _rows(mesh)),
              out_shardings=(_rows(mesh), sharding_lib.replicated(mesh)))


@functools.lru_cache(maxsize=64)
def _optimize_program(model_config, loss_side, optim_config, mesh, rules, options):
  fn = functools.partial(_optimize, model_config, loss_side, optim_config)
  if mesh is None:
    return _jit(fn, None, None, options, donate_argnums=0)
  shardings = _state_shardings(model_config, loss_side.value, loss_side.kl_coef > 0, optim_config, mesh, rules)
  return _jit(fn, mesh, rules, options, in_shardings=(shardings, _rows(mesh)),
              out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


def make_update(model_config: ModelConfig, update_config: UpdateConfig, optim_config: OptimConfig, *, mesh=None,
                rules=None, compiler_options: Mapping[str, Any] | None = None
                ) -> Callable[[TrainState, EpisodeBatch], tuple[TrainState, dict]]:
  """-> `update(state, batch) -> (state, metrics)`; the state is donated (use the returned one).

  batch: an EpisodeBatch [B, L] (host numpy or device arrays) whose `logprobs` are the behaviour policy's.
  The update is two jitted programs: `prepare` (critic values, reference log-probs, credit) and
  `optimize` (epochs x minibatches of guarded optimizer steps). `optimize` depends on the estimator only through
  its critic level, so a sweep over estimators compiles it once per critic level.

  metrics (float32 scalars; means over the E x M minibatch steps unless the name ends in _min / _max):
    loss, policy_loss, clip_frac (+ _low / _high), dual_clip_frac, approx_kl, log_ratio_clamp_frac,
    ratio_mean / _min / _max, entropy; with a critic: value_loss, vf_clip_frac, explained_variance, value_mean,
    return_mean; with kl_coef > 0: kl, kl_max; advantage_mean / advantage_std (over action tokens, whole batch),
    grad_norm (before clipping), skipped (minibatch steps skipped in this update for a non-finite loss or
    gradient), skipped_updates (so far), actor_lr / critic_lr (after this update).
  With `mesh` and `rules`: state and batch are first placed in their shardings (a no-op when they already are; the
  batch over data x fsdp) and both programs run under the logical-axis rules. `update.state_shardings` holds the
  state's shardings (None without a mesh). compiler_options: XLA options for both programs (`jax.jit`'s).
  Compiled programs are cached on the configs, so calling make_update again with the same ones recompiles nothing.
  """
  model_config.validate()
  update_config.validate()
  optim_config.validate()
  _check_mesh_args(mesh, rules)
  config = update_config
  with_ref = config.kl_coef > 0
  options = _options_key(compiler_options)
  prepare = _prepare_program(model_config, config.value, config.credit, with_ref, config.minibatches, mesh, rules,
                             options)
  optimize = _optimize_program(model_config, _loss_side(config), optim_config, mesh, rules, options)
  state_shardings = None
  if mesh is not None:
    state_shardings = _state_shardings(model_config, config.value, with_ref, optim_config, mesh, rules)

  def update(state: TrainState, batch: EpisodeBatch) -> tuple[TrainState, dict]:
    check_update_batch(config, batch.batch_size, mesh)  # before anything compiles
    if mesh is not None:
      state = jax.device_put(state, state_shardings)
      batch = jax.device_put(batch, sharding_lib.batch_shardings(batch, mesh))
    data, credit_metrics = prepare(state.params, state.ref_params, batch)
    state, metrics = optimize(state, data)
    return state, {**metrics, **credit_metrics}

  update.state_shardings = state_shardings
  return update


# ------------------------------------------------------------------------------------------------------
# SFT warm start (behaviour cloning on action tokens).
# ------------------------------------------------------------------------------------------------------


def sft_loss(logits: Array, batch: EpisodeBatch) -> tuple[Array, dict]:
  """Cross-entropy on action tokens only. logits [B, L, V] (position p predicts token p + 1) -> (loss [], metrics).

  Prompt, observation and padding tokens carry no loss: their targets do not reach the loss or its gradient.
  """
  logp = losses.shifted_logprobs(logits, batch.tokens)
  nll = -losses.aggregate(logp, batch.action_mask, mode="token-mean")
  predicted = jnp.pad(jnp.argmax(logits[:, :-1], axis=-1), ((0, 0), (1, 0)))
  accuracy = losses.masked_mean(predicted == batch.tokens, batch.action_mask)
  return nll, {"nll": jax.lax.stop_gradient(nll), "token_accuracy": accuracy}


def init_sft_state(model_config: ModelConfig, optim_config: OptimConfig, key: Array,
                   policy_params: dict | None = None, *, mesh=None, rules=None) -> TrainState:
  """A policy-only TrainState (params = {"policy": Transformer tree}, no reference) for `make_sft_update`."""
  return _init_state(model_config, ValueConfig(kind=None), False, optim_config, key, policy_params, mesh, rules)


def _sft_step(model_config: ModelConfig, optim_config: OptimConfig, state: TrainState,
              batch: EpisodeBatch) -> tuple[TrainState, dict]:
  module = Transformer(model_config)

  def loss_fn(params, batch):
    logits, _, _ = module.apply({"params": params["policy"]}, batch.tokens)
    return sft_loss(logits, batch)

  params, opt_state, finite, loss, grad_norm, metrics = _guarded_step(make_optimizer(optim_config), loss_fn,
                                                                      state.params, state.opt_state, batch)
  skipped_updates = state.skipped_updates + (~finite).astype(jnp.int32)
  metrics.update(loss=loss, grad_norm=grad_norm, skipped=~finite, skipped_updates=skipped_updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_updates=skipped_updates)
  return new_state, _as_float32(metrics)


@functools.lru_cache(maxsize=16)
def _sft_program(model_config, optim_config, mesh, rules, options):
  fn = functools.partial(_sft_step, model_config, optim_config)
  if mesh is None:
    return _jit(fn, None, None, options, donate_argnums=0)
  shardings = _state_shardings(model_config, ValueConfig(kind=None), False, optim_config, mesh, rules)
  return _jit(fn, mesh, rules, options, in_shardings=(shardings, _rows(mesh)),
              out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


def make_sft_update(model_config: ModelConfig, optim_config: OptimConfig, *, mesh=None, rules=None,
                    compiler_options: Mapping[str, Any] | None = None
                    ) -> Callable[[TrainState, EpisodeBatch], tuple[TrainState, dict]]:
  """-> `update(state, batch) -> (state, metrics)`: one AdamW step (actor_lr) on `sft_loss`; the state is donated.

  state: from `init_sft_state`. metrics: loss (= nll), nll, token_accuracy, grad_norm, skipped, skipped_updates;
  a non-finite loss or gradient skips the step, as in `make_update` (mesh, rules, compiler_options as there).
  """
  model_config.validate()
  optim_config.validate()
  _check_mesh_args(mesh, rules)
  step = _sft_program(model_config, optim_config, mesh, rules, _options_key(compiler_options))
  state_shardings = None
  if mesh is not None:
    state_shardings = _state_shardings(model_config, ValueConfig(kind=None), False, optim_config, mesh, rules)

  def update(state: TrainState, batch: EpisodeBatch) -> tuple[TrainState, dict]:
    if set(state.params) != {"policy"} or "value_head" in state.params["policy"]:
      _fail("sft.state", "expected a policy-only TrainState from init_sft_state (params = {'policy': Transformer "
            "params}); add a value head or critic afterwards with init_train_state(..., policy_params=...)")
    if mesh is not None:
      sharding_lib.check_batch_divisible(batch.batch_size, mesh, "batch_size")
      state = jax.device_put(state, state_shardings)
      batch = jax.device_put(batch, sharding_lib.batch_shardings(batch, mesh))
    return step(state, batch)

  update.state_shardings = state_shardings
  return update


def sft_warm_start(model_config: ModelConfig, optim_config: OptimConfig, expert_rollout: Callable, env_params: Any,
                   key: Array, num_updates: int, state: TrainState | None = None, *, updates_per_batch: int = 1,
                   log: Callable[[int, dict], None] | None = None,
                   compiler_options: Mapping[str, Any] | None = None) -> tuple[TrainState, list[dict]]:
  """Behaviour cloning on scripted-expert episodes: collect a batch, take `updates_per_batch` SFT steps, repeat.

  expert_rollout: `rollout(params, env_params, key) -> (EpisodeBatch, info)`, e.g.
    `jax.jit(rollout.make_rollout(Transformer(model_config), env, rollout_config, actor="expert"))`.
  state: from `init_sft_state` (a fresh random one when None). log(i, metrics) is called after every update.
  Returns the final state (feed `state.params["policy"]` to `init_train_state`) and the per-update metrics (host).
  """
  _check_int(num_updates, "sft.num_updates", 0)
  _check_int(updates_per_batch, "sft.updates_per_batch", 1)
  key = jax.random.key(key) if isinstance(key, int) else key
  init_key, key = jax.random.split(key)
  if state is None:
    state = init_sft_state(model_config, optim_config, init_key)
  update = make_sft_update(model_config, optim_config, compiler_options=compiler_options)
  history = []
  batch = None
  for i in range(num_updates):
    if i % updates_per_batch == 0:
      key, rollout_key = jax.random.split(key)
      batch, _ = expert_rollout(state.params["policy"], env_params, rollout_key)
    state, metrics = update(state, batch)
    metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
    history.append(metrics)
    if log is not None:
      log(i, metrics)
  return state, history


# ------------------------------------------------------------------------------------------------------
# make_train: rollout + update, PureJaxRL-style (pure-JAX environments).
# ------------------------------------------------------------------------------------------------------


def rollout_metrics(batch: EpisodeBatch, info: Any) -> dict:
  """Per-batch rollout statistics (float32 scalars) from an EpisodeBatch and its `rollout.RolloutInfo`.

  success_rate (episodes the environment scored as solved), return_mean (undiscounted), episode_steps (mean steps
  per episode), invalid_rate (steps whose action parsed as no command, over all steps), terminated_frac,
  truncated_frac, context_len (mean tokens per row), agent_steps and action_tokens (totals: what steps/s and
  tokens/s count).
  """
  steps = batch.num_steps()
  total_steps = jnp.sum(steps)
  return _as_float32({
      "success_rate": jnp.mean(info.success),
      "return_mean": jnp.mean(batch.episode_returns()),
      "episode_steps": jnp.mean(steps),
      "invalid_rate": jnp.sum(info.invalid_steps) / jnp.maximum(total_steps, 1),
      "terminated_frac": jnp.mean(batch.terminated),
      "truncated_frac": jnp.mean(batch.truncated),
      "context_len": jnp.mean(batch.seq_len),
      "agent_steps": total_steps,
      "action_tokens": jnp.sum(batch.action_mask),
  })


def _check_env_rollout(env, rollout_config, model_config: ModelConfig, field: str) -> None:
  """One line before anything compiles: the rollout must fit the model and the environment."""
  try:
    rollout_config.validate(env.max_obs_len, model_config.vocab_size)
  except ValueError as error:
    raise ValueError(f"{field}.{error}" if not str(error).startswith(field) else str(error)) from None
  if rollout_config.max_len > model_config.max_position_embeddings:
    _fail(f"{field}.max_len", f"{rollout_config.max_len} exceeds the model's max_position_embeddings "
          f"{model_config.max_position_embeddings}")


def task_pool_keys(pool_seed: int, pool_size: int) -> Array:
  """[pool_size] reset keys of a fixed pool of training tasks (a training set of questions, as in LLM RL)."""
  _check_int(pool_size, "train.task_pool", 1)
  return jax.random.split(jax.random.fold_in(jax.random.key(pool_seed), 0x7A5C), pool_size)


def make_train_iteration(model_config: ModelConfig, env, rollout_config, update_config: UpdateConfig,
                         optim_config: OptimConfig, task_pool: Array | None = None
                         ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """-> `iteration(state, env_params) -> (state, metrics)`: one pure (un-jitted) RL iteration on a JAX environment.

  It samples `rollout_config.batch_size` episodes with the current policy (the rollout key is split off
  `state.rng`), then runs the update of `make_update` (critic values and reference log-probs, credit, epochs x
  minibatches) on them. metrics: `make_update`'s plus `rollout_metrics`'. Pure: scan it, jit it, vmap it over seeds.
  task_pool: [P] reset keys (`task_pool_keys`); each iteration then draws its num_tasks tasks from this fixed pool
  (without replacement when P >= num_tasks) instead of fresh random tasks.
  """
  model_config.validate()
  update_config.validate()
  optim_config.validate()
  _check_env_rollout(env, rollout_config, model_config, "rollout")
  check_update_batch(update_config, rollout_config.batch_size)
  config = update_config
  sample = rollout_lib.make_rollout(Transformer(model_config), env, rollout_config)
  with_ref = config.kl_coef > 0
  loss_side = _loss_side(config)

  num_tasks = rollout_config.num_tasks

  def draw_tasks(key):
    if task_pool is None:
      return None
    pool_size = task_pool.shape[0]
    index = jax.random.choice(key, pool_size, (num_tasks,), replace=pool_size < num_tasks)
    return task_pool[index]

  def iteration(state: TrainState, env_params: Any) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    tasks = draw_tasks(jax.random.fold_in(rollout_key, 1))
    batch, info = sample(_policy_trunk(state.params["policy"]), env_params, rollout_key, 0, tasks)
    state = state.replace(rng=_raw_key(rng))
    data, credit_metrics = _prepare(model_config, config.value.kind, config.credit, with_ref, config.minibatches,
                                    state.params, state.ref_params, batch)
    state, metrics = _optimize(model_config, loss_side, optim_config, state, data)
    return state, {**metrics, **credit_metrics, **rollout_metrics(batch, info)}

  return iteration


def make_host_train_iteration(model_config: ModelConfig, rollout_config, tokenizer, update_config: UpdateConfig,
                              optim_config: OptimConfig, *,
                              compiler_options: Mapping[str, Any] | None = None) -> Callable:
  """-> `iteration(state, pool, seeds, group_ids=None) -> (state, metrics)` for host environments (TextWorld, any
  `envs.host.HostEnv`): the host loop around the same jitted pieces. One call rolls out one episode per env of `pool`
  (`rollout.make_host_rollout`, reset with `seeds`; the rollout key is split off `state.rng` as in
  `make_train_iteration`), then runs `make_update` on the batch. metrics (host floats): the update's plus
  `rollout_metrics`'. With update.halt_on_nonfinite a skipped minibatch raises (`check_halt`).
  """
  update_config.validate()
  host_rollout = rollout_lib.make_host_rollout(Transformer(model_config), rollout_config, tokenizer)
  update = make_update(model_config, update_config, optim_config, compiler_options=compiler_options)

  def iteration(state: TrainState, pool, seeds, group_ids=None) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    batch, info = host_rollout(_policy_trunk(state.params["policy"]), pool, seeds, rollout_key, group_ids)
    state, metrics = update(state.replace(rng=_raw_key(rng)), batch)
    metrics = {name: float(value) for name, value in
               jax.device_get({**metrics, **rollout_metrics(batch, info)}).items()}
    check_halt(metrics, update_config)
    return state, metrics

  return iteration


def make_train(model_config: ModelConfig, env, rollout_config, update_config: UpdateConfig,
               optim_config: OptimConfig, num_iterations: int, task_pool: Array | None = None) -> Callable:
  """-> `train(key, env_params, policy_params=None) -> (state, metrics)`, PureJaxRL-style: one pure function that
  initialises a TrainState (from `policy_params`, e.g. an SFT warm start, else random) and runs `num_iterations`
  of `make_train_iteration` (with its `task_pool`) in a `lax.scan`. metrics: each iteration's, stacked to
  [num_iterations].

  Jit it once; `jax.vmap(train, in_axes=(0, None, None))(keys, env_params, policy_params)` trains one run per seed
  in one program (in_axes 0 for per-seed policy_params).
  """
  _check_int(num_iterations, "train.num_iterations", 1)
  iteration = make_train_iteration(model_config, env, rollout_config, update_config, optim_config, task_pool)

  def train(key: Array, env_params: Any, policy_params: dict | None = None) -> tuple[TrainState, dict]:
    state = init_train_state(model_config, update_config, optim_config, key, policy_params)
    return jax.lax.scan(lambda state, _: iteration(state, env_params), state, None, length=num_iterations)

  return train


def make_sft_iteration(model_config: ModelConfig, optim_config: OptimConfig, env,
                       rollout_config) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """-> `step(state, env_params) -> (state, metrics)`: one pure SFT step on a fresh batch of scripted-expert
  episodes (the rollout key is split off `state.rng`). state: from `init_sft_state`. metrics: `make_sft_update`'s."""
  model_config.validate()
  optim_config.validate()
  _check_env_rollout(env, rollout_config, model_config, "sft.rollout")
  expert = rollout_lib.make_rollout(Transformer(model_config), env, rollout_config, actor="expert")

  def step(state: TrainState, env_params: Any) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    batch, _ = expert(state.params["policy"], env_params, rollout_key)
    return _sft_step(model_config, optim_config, state.replace(rng=_raw_key(rng)), batch)

  return step


def make_sft_train(model_config: ModelConfig, optim_config: OptimConfig, env, rollout_config,
                   num_steps: int) -> Callable:
  """-> `sft(key, env_params, policy_params=None) -> (policy_params, metrics)`: the SFT warm start as one pure
  function, `num_steps` of `make_sft_iteration` in a `lax.scan`. metrics: stacked to [num_steps]. vmap it over
  seeds like `make_train`.
  """
  _check_int(num_steps, "sft.num_steps", 1)
  step = make_sft_iteration(model_config, optim_config, env, rollout_config)

  def sft(key: Array, env_params: Any, policy_params: dict | None = None) -> tuple[dict, dict]:
    state = init_sft_state(model_config, optim_config, key, policy_params)
    state, metrics = jax.lax.scan(lambda state, _: step(state, env_params), state, None, length=num_steps)
    return state.params["policy"], metrics

  return sft


def make_evaluate(model_config: ModelConfig, env, rollout_config, num_episodes: int) -> Callable:
  """-> `evaluate(policy_params, env_params, key) -> metrics`: `num_episodes` held-out episodes, greedy and sampled.

  Pass a key that training never uses (e.g. `jax.random.key(eval_seed)`, fixed for a whole study) so every run and
  method is scored on the same held-out tasks; or task_keys [num_episodes] to score given tasks (e.g. the
  training pool). policy_params may carry a value head (ignored). metrics (float32):
  success (greedy), success_sampled, return (greedy), return_sampled, episode_steps (greedy),
  invalid_rate (greedy).
  """
  _check_int(num_episodes, "eval.num_episodes", 1)
  config = dataclasses.replace(rollout_config, num_tasks=num_episodes, episodes_per_task=1)
  _check_env_rollout(env, config, model_config, "eval.rollout")
  model = Transformer(model_config)
  greedy = rollout_lib.make_rollout(model, env, dataclasses.replace(config, greedy=True))
  sampled = rollout_lib.make_rollout(model, env, dataclasses.replace(config, greedy=False))

  def evaluate(policy_params: dict, env_params: Any, key: Array, task_keys: Array | None = None) -> dict:
    params = _policy_trunk(policy_params)
    # One key for both: the same held-out tasks (the reset keys come from the rollout key's first split).
    greedy_metrics = rollout_metrics(*greedy(params, env_params, key, 0, task_keys))
    sampled_metrics = rollout_metrics(*sampled(params, env_params, key, 0, task_keys))
    return {"success": greedy_metrics["success_rate"], "success_sampled": sampled_metrics["success_rate"],
            "return": greedy_metrics["return_mean"], "return_sampled": sampled_metrics["return_mean"],
            "episode_steps": greedy_metrics["episode_steps"], "invalid_rate": greedy_metrics["invalid_rate"]}

  return evaluate


# ------------------------------------------------------------------------------------------------------
# Checkpoints (orbax).
# ------------------------------------------------------------------------------------------------------

_STATE_ITEM, _EXTRA_ITEM = "state", "extra"


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """A writer: keeps the last `max_to_keep` checkpoints (None keeps all) and saves in a background thread.

  Leftover `*.orbax-checkpoint-tmp*` directories of an interrupted run are removed in the background when it
  opens (at the latest before its first save). Call `manager.wait_until_finished()` (or `manager.close()`) before
  the process exits.
  """
  if max_to_keep is not None:
    _check_int(max_to_keep, "checkpoint.max_to_keep", 1)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=(_STATE_ITEM, _EXTRA_ITEM))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int | None = None,
                    extra_metadata: Mapping[str, Any] | None = None) -> bool:
  """Starts saving `state` as checkpoint `step` (default: state.step) with JSON `extra_metadata`.

  Asynchronous when the manager is: the device arrays are copied to host before this returns, so the next
  (donating) update may run at once. Returns whether a save was started.
  """
  step = int(np.asarray(state.step)) if step is None else int(step)
  extra = dict(extra_metadata or {})
  try:
    json.dumps(extra)
  except TypeError as error:
    raise ValueError(f"checkpoint.extra_metadata: must be JSON-serializable ({error})") from None
  return manager.save(step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                                       _EXTRA_ITEM: ocp.args.JsonSave(extra)}))


def _abstract_leaf(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def abstract_state(state: TrainState) -> TrainState:
  """ShapeDtypeStructs (with the shardings of device arrays) of a state: a restore target for `restore_checkpoint`."""
  return jax.tree.map(_abstract_leaf, state)


def _with_sharding(abstract: Any) -> Any:
  """Concrete leaves become ShapeDtypeStructs; leaves without a sharding (host arrays, `jax.eval_shape` output)
  restore onto the first device."""
  default = _default_sharding()

  def fill(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      x = _abstract_leaf(x)
    if x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree.map(fill, abstract)


def _reader(directory_or_manager) -> tuple[ocp.CheckpointManager, bool]:
  if isinstance(directory_or_manager, ocp.CheckpointManager):
    directory_or_manager.wait_until_finished()  # a save of this manager may still be in flight
    return directory_or_manager, False
  path = os.path.abspath(os.fspath(directory_or_manager))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint.directory: {path} does not exist")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(path, options=options, item_names=(_STATE_ITEM, _EXTRA_ITEM)), True


def _checkpoint_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  steps = manager.all_steps()  # finalized checkpoints only: orbax never lists a tmp directory
  if not steps:
    raise FileNotFoundError(f"checkpoint.directory: {manager.directory} holds no complete checkpoint")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"checkpoint.step: {step} is not a complete checkpoint in {manager.directory}; "
                            f"available: {sorted(steps)}")
  return int(step)


def restore_checkpoint(directory_or_manager, abstract: TrainState, step: int | None = None) -> tuple[TrainState, int]:
  """Restores the latest complete checkpoint (or `step`) into the structure, dtypes and shardings of `abstract`.

  abstract: a TrainState of ShapeDtypeStructs (`abstract_state(state)`, or `jax.eval_shape` of an init; leaves
    without a sharding land on the first device) or a concrete state used as the template.
  Raises FileNotFoundError "checkpoint.directory: ... does not exist" / "... holds no complete checkpoint".
  """
  manager, owned = _reader(directory_or_manager)
  try:
    step = _checkpoint_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{_STATE_ITEM: ocp.args.StandardRestore(_with_sharding(abstract))}))
    return restored[_STATE_ITEM], step
  finally:
    if owned:
      manager.close()


def checkpoint_metadata(directory_or_manager, step: int | None = None) -> dict:
  """The `extra_metadata` saved with the latest complete checkpoint (or `step`)."""
  manager, owned = _reader(directory_or_manager)
  try:
    step = _checkpoint_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(**{_EXTRA_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[_EXTRA_ITEM] or {})
  finally:
    if owned:
      manager.close()
