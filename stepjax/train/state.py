"""The train state, the spec that fixes its structure, its shardings, and its initialisation.

Param tree of a `TrainState` per `ValueConfig.kind`:

    "head":      params = {"policy": Transformer tree + value_head/{kernel [D], bias []}}
    "separate":  params = {"policy": Transformer tree, "critic": Critic tree (no lm_head) + value_head}
    None:        params = {"policy": Transformer tree}

A `StateSpec` (frozen, hashable) names everything the state's structure and shardings depend on; it is also the key
on which compiled programs are cached. Shardings come from one `jax.eval_shape` over the whole *boxed* state (the
modules' logical axes, then the Adam moments inherit them through the optimizer's init), mapped to the mesh by the
rule table, as MaxText does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct
from jax.sharding import Mesh, SingleDeviceSharding

from stepjax import checks
from stepjax import sharding as sharding_lib
from stepjax.models.transformer import ModelConfig, Transformer
from stepjax.models.value import ValueConfig, build_models, init_models
from stepjax.train.config import OptimConfig, UpdateConfig
from stepjax.train.optim import CRITIC, make_optimizer

Array = Any


@struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-identically.

  step: [] int32, number of updates so far.
  params: {"policy": ..., "critic": ... (kind "separate" only)}; see the module docstring.
  opt_state: the `make_optimizer` state of `params`.
  ref_params: frozen Transformer params of the reference policy (no value head), or None without a KL term.
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


def options_key(compiler_options: Mapping[str, Any] | None) -> tuple:
  """A hashable form of XLA compiler options (`jax.jit`'s), for a `StateSpec`."""
  if compiler_options is None:
    return ()
  if not isinstance(compiler_options, Mapping):
    checks.fail("compiler_options", f"expected a mapping of XLA option names to values, got "
                f"{type(compiler_options).__name__}")
  return tuple(sorted(compiler_options.items()))


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What a TrainState's structure, shardings and compiled programs depend on (the compile-cache key).

  model, optim: the policy's and optimizer's configs. value: the critic (ValueConfig(kind=None) for none, e.g. SFT).
  with_ref: a frozen reference policy is kept (KL term). mesh, rules: both or neither; with them every program
  runs sharded under the logical-axis rules. options: XLA compiler options as sorted (name, value) pairs.
  """

  model: ModelConfig
  optim: OptimConfig
  value: ValueConfig = ValueConfig(kind=None)
  with_ref: bool = False
  mesh: Mesh | None = None
  rules: tuple | None = None
  options: tuple = ()

  def __post_init__(self):
    self.model.validate()
    self.optim.validate()
    if (self.mesh is None) != (self.rules is None):
      checks.fail("rules" if self.rules is None else "mesh", "pass mesh and rules together")

  @classmethod
  def for_update(cls, model: ModelConfig, update: UpdateConfig, optim: OptimConfig, *, mesh=None, rules=None,
                 compiler_options: Mapping[str, Any] | None = None) -> "StateSpec":
    update.validate()
    return cls(model=model, optim=optim, value=update.value, with_ref=update.with_ref, mesh=mesh, rules=rules,
               options=options_key(compiler_options))

  @classmethod
  def for_sft(cls, model: ModelConfig, optim: OptimConfig, *, mesh=None, rules=None,
              compiler_options: Mapping[str, Any] | None = None) -> "StateSpec":
    """A policy-only state (no critic, no reference): SFT."""
    return cls(model=model, optim=optim, mesh=mesh, rules=rules, options=options_key(compiler_options))

  def jit(self, fn: Callable, *, in_shardings=None, out_shardings=None, donate_argnums=()) -> Callable:
    """`jax.jit` with this spec's compiler options; on a mesh, with explicit shardings under the rules."""
    compiler_options = dict(self.options) or None
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums, compiler_options=compiler_options)
    return sharding_lib.jit_with_rules(fn, self.mesh, self.rules, in_shardings=in_shardings,
                                       out_shardings=out_shardings, donate_argnums=donate_argnums,
                                       compiler_options=compiler_options)

  def rows(self):
    """The sharding of any batch-major tree (a prefix: every leaf's leading axis over data x fsdp)."""
    return sharding_lib.batch_sharding(self.mesh, 1)

  def replicated(self):
    return sharding_lib.replicated(self.mesh)


def raw_key(key: Array) -> Array:
  """A typed or raw key -> its [2] uint32 data (what TrainState.rng holds)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def policy_trunk(policy_params: dict) -> dict:
  """Transformer params of a policy tree (the value head, if any, dropped)."""
  return {k: v for k, v in policy_params.items() if k != "value_head"}


def default_sharding() -> SingleDeviceSharding:
  """Where a state without a mesh lives: the first device (committed)."""
  return SingleDeviceSharding(jax.devices()[0])


def new_state(spec: StateSpec, params: dict, rng: Array) -> TrainState:
  """The TrainState around `params` (optimizer init, reference copy when spec.with_ref), traceable: `init_state`'s
  arithmetic without its jits, for a caller that builds the state inside its own (sharded, vmapped) program. The
  reference aliases the policy's arrays: copy the result before a program that donates it."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(spec.optim).init(params),
                    ref_params=policy_trunk(params["policy"]) if spec.with_ref else None, rng=rng,
                    skipped_updates=jnp.zeros((), jnp.int32))


def _boxed_abstract_state(spec: StateSpec) -> TrainState:
  """The TrainState `init_state` builds, as ShapeDtypeStructs still boxed with their logical axes."""
  policy_module, critic_module = build_models(spec.model, spec.value)
  dummy = jnp.zeros((1, 1), jnp.int32)

  def boxed_state():
    params = {"policy": policy_module.init(jax.random.key(0), dummy)["params"]}
    if critic_module is not None:
      params[CRITIC] = critic_module.init(jax.random.key(0), dummy)["params"]
    return new_state(spec, params, jnp.zeros((2,), jnp.uint32))

  return jax.eval_shape(boxed_state)


def abstract_state(spec: StateSpec) -> TrainState:
  """The TrainState of `spec` as ShapeDtypeStructs (shapes and dtypes of parameters, Adam moments, reference),
  nothing allocated: with `state_shardings`, what a memory plan needs."""
  return nn.meta.unbox(_boxed_abstract_state(spec))


@functools.lru_cache(maxsize=64)
def state_shardings(spec: StateSpec) -> TrainState:
  """A TrainState of NamedShardings on spec.mesh (parameters, Adam moments, reference), nothing allocated."""
  boxed = _boxed_abstract_state(spec)
  return sharding_lib.shardings_from_logical(sharding_lib.logical_specs(boxed), spec.mesh, spec.rules)


@functools.lru_cache(maxsize=64)
def _init_program(spec: StateSpec) -> Callable:
  """Jitted (params, raw rng) -> fresh TrainState (optimizer state, reference copy), in its shardings on a mesh."""

  def finish(params, rng):
    # Fresh buffers everywhere: the reference must not alias the policy (nor the caller's arrays), since the
    # update donates the whole state.
    return jax.tree.map(jnp.copy, new_state(spec, params, rng))

  if spec.mesh is None:
    # Committed to one device, like a restored checkpoint, so both hit the same compiled update.
    return jax.jit(finish, out_shardings=default_sharding())
  return spec.jit(finish, out_shardings=state_shardings(spec))


def init_state(spec: StateSpec, key: Array, policy_params: dict | None = None) -> TrainState:
  """A fresh TrainState of `spec`. policy_params: Transformer params to start from (HF checkpoint, SFT), else random;
  stored in `spec.model.param_dtype` whatever their dtype (`value.init_models` casts them).

  On a mesh every array is created directly in its sharding (`state_shardings`).
  """
  key = jax.random.key(key) if isinstance(key, int) else key
  trunk_key, init_key, rng = jax.random.split(key, 3)
  if policy_params is None and spec.mesh is not None:
    # Each device materialises only its own shard of the random trunk.
    trunk = Transformer(spec.model)
    policy_params, _ = sharding_lib.sharded_init(
        lambda k: trunk.init(k, jnp.zeros((1, 1), jnp.int32))["params"], spec.mesh, spec.rules, trunk_key)
  # init_models jits (and caches per module) the random init, so repeated calls compile it once.
  policy, critic = init_models(spec.model, spec.value, init_key, policy_params)
  params = {"policy": policy} if critic is None else {"policy": policy, CRITIC: critic}
  return _init_program(spec)(params, raw_key(rng))


def init_train_state(model_config: ModelConfig, update_config: UpdateConfig, optim_config: OptimConfig, key: Array,
                     policy_params: dict | None = None, *, mesh=None, rules=None) -> TrainState:
  """A fresh RL TrainState (critic per update.value, reference copy when kl_coef > 0); see `init_state`."""
  return init_state(StateSpec.for_update(model_config, update_config, optim_config, mesh=mesh, rules=rules), key,
                    policy_params)


def init_sft_state(model_config: ModelConfig, optim_config: OptimConfig, key: Array,
                   policy_params: dict | None = None, *, mesh=None, rules=None) -> TrainState:
  """A policy-only TrainState (params = {"policy": Transformer tree}, no reference) for SFT."""
  return init_state(StateSpec.for_sft(model_config, optim_config, mesh=mesh, rules=rules), key, policy_params)


def train_state_shardings(model_config: ModelConfig, update_config: UpdateConfig, optim_config: OptimConfig, mesh,
                          rules) -> TrainState:
  """A TrainState of NamedShardings under the logical-axis `rules` (parameters, Adam moments, reference)."""
  return state_shardings(StateSpec.for_update(model_config, update_config, optim_config, mesh=mesh, rules=rules))
