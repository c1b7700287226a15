"""Value networks: a scalar head on the policy's trunk, or a separate critic transformer.

Both read a value at every position; the learner picks V(s_t) at step boundaries with
`EpisodeBatch.step_values(values)` (position step_start - 1) and the bootstrap with `bootstrap_values`.

Param trees: `PolicyWithValue` = the `Transformer` tree + `value_head/{kernel [D], bias []}`;
`Critic` = the `Transformer` tree without `lm_head` + `value_head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stepjax import checks
from stepjax.models.transformer import KVCache, ModelConfig, Transformer, init_params

Array = Any

VALUE_KINDS = ("head", "separate", None)


@dataclasses.dataclass(frozen=True)
class ValueConfig:
  """How the critic is built.

  kind: "head" (scalar head on the policy trunk), "separate" (its own transformer) or None (no critic: GRPO, RLOO).
  stop_gradient: with kind="head", the value loss does not reach the shared trunk (ignored otherwise).
  init_from_policy: with kind="separate", the critic's trunk starts as a copy of the policy's.
  """

  kind: str | None = "head"
  stop_gradient: bool = False
  init_from_policy: bool = True

  def validate(self) -> "ValueConfig":
    checks.check_choice(self.kind, "kind", VALUE_KINDS)
    return self


class ValueHead(nn.Module):
  """hidden [B, T, D] -> values [B, T] float32 (a linear read-out, computed in float32)."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    d = hidden.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("embed",)), (d,),
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), self.param_dtype)
    values = jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), kernel.astype(jnp.float32)) + bias
    return nn.with_logical_constraint(values, ("activation_batch", "activation_length"))


class _WithValueHead(Transformer):
  """A Transformer trunk with a scalar value head (`value_head`) on its final hidden states."""

  def setup(self):
    super().setup()
    self.value_head = ValueHead(self.config.storage_dtype)


class PolicyWithValue(_WithValueHead):
  """The policy LM plus a value head on its final hidden states.

  __call__(tokens, positions=None, cache=None, chunk_lengths=None)
    -> (logits [B, T, V] float32, values [B, T] float32, hidden [B, T, D], new_cache | None)
  """

  stop_gradient: bool = False

  def __call__(self, tokens: Array, positions: Array | None = None, cache: KVCache | None = None,
               chunk_lengths: Array | None = None):
    hidden, new_cache = self.trunk(tokens, positions, cache, chunk_lengths)
    features = jax.lax.stop_gradient(hidden) if self.stop_gradient else hidden
    return self.logits(hidden), self.value_head(features), hidden, new_cache


class Critic(_WithValueHead):
  """A separate value transformer: the same trunk, a scalar head instead of the LM head.

  __call__(tokens, positions=None, cache=None, chunk_lengths=None)
    -> (values [B, T] float32, hidden [B, T, D], new_cache | None)
  """

  def __call__(self, tokens: Array, positions: Array | None = None, cache: KVCache | None = None,
               chunk_lengths: Array | None = None):
    hidden, new_cache = self.trunk(tokens, positions, cache, chunk_lengths)
    return self.value_head(hidden), hidden, new_cache


def init_value_head(hidden_size: int, key: Array, param_dtype: Any = jnp.float32) -> dict:
  """Fresh `value_head` params {kernel [D], bias []}, drawn in float32 and then cast to `param_dtype`, so a
  bfloat16-param state starts from the float32 state's head of the same key, rounded (a direct bfloat16 draw
  would be a different sample)."""
  variables = ValueHead(jnp.float32).init(key, jnp.zeros((1, 1, hidden_size), jnp.float32))
  return jax.tree.map(lambda x: x.astype(param_dtype), nn.unbox(variables["params"]))


def add_value_head(policy_params: dict, key: Array) -> dict:
  """Transformer params (e.g. a loaded checkpoint) -> PolicyWithValue params with a fresh value head."""
  embedding = policy_params["embed"]["embedding"]
  return {**policy_params, "value_head": init_value_head(embedding.shape[1], key, embedding.dtype)}


def init_critic_from_policy(policy_params: dict, key: Array) -> dict:
  """Critic params whose trunk is a copy of the policy's (LM head dropped) and a fresh value head.

  The trunk is copied, not aliased, so donating one tree's buffers in a train step never invalidates the other.
  """
  trunk = {k: jax.tree.map(jnp.copy, v) for k, v in policy_params.items() if k not in ("lm_head", "value_head")}
  return add_value_head(trunk, key)


def as_storage_dtype(params, config: ModelConfig):
  """Floating leaves of `params` cast to `config.storage_dtype` (leaves already in it pass through, uncopied)."""
  dtype = config.storage_dtype

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

  return jax.tree.map(cast, params)


def build_models(config: ModelConfig, value_config: ValueConfig) -> tuple[nn.Module, nn.Module | None]:
  """(policy module, critic module or None) for a value config.

  kind="head": (PolicyWithValue, None); "separate": (Transformer, Critic); None: (Transformer, None).
  """
  value_config.validate()
  if value_config.kind == "head":
    return PolicyWithValue(config, stop_gradient=value_config.stop_gradient), None
  if value_config.kind == "separate":
    return Transformer(config), Critic(config)
  return Transformer(config), None


def init_models(config: ModelConfig, value_config: ValueConfig, key: Array,
                policy_params: dict | None = None) -> tuple[dict, dict | None]:
  """(policy params, critic params or None) matching `build_models`.

  `policy_params`: Transformer params to start from (e.g. `load_hf_checkpoint`); fresh ones when None. They are
  cast to `config.param_dtype`, so the storage dtype is the config's choice whatever the source (float32 numpy
  params start a bfloat16-param run), and the value head and a critic copied from them follow it too.
  """
  value_config.validate()
  policy_key, head_key, critic_key = jax.random.split(key, 3)
  if policy_params is None:
    policy_params = init_params(Transformer(config), policy_key)
  policy_params = {k: as_storage_dtype(v, config) for k, v in policy_params.items() if k != "value_head"}
  if value_config.kind == "head":
    return add_value_head(policy_params, head_key), None
  if value_config.kind == "separate":
    if value_config.init_from_policy:
      return policy_params, init_critic_from_policy(policy_params, head_key)
    return policy_params, init_params(Critic(config), critic_key)
  return policy_params, None
