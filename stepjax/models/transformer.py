"""Decoder-only transformer (Llama / Qwen2 / Qwen3 family) in Flax linen, with a ragged per-row KV cache.

Pure init/apply: `Transformer(config).apply({'params': params}, tokens, positions, cache, chunk_lengths)`
returns `(logits [B, T, V] float32, hidden [B, T, D], new_cache)`.

Parameters and activations carry *logical* axis names only (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `norm`, `layers`; `activation_*`, `cache_*`); `stepjax.sharding` maps them to mesh axes.

Param tree (plain stack; `scan_layers=True` replaces `layers_{i}` by one `layers` entry whose leaves have a
leading [num_layers] axis named `layers`)::

  embed/embedding                 [V, D]        (vocab, embed)
  layers_{i}/attn_norm/scale      [D]           (norm,)
  layers_{i}/attn/q_proj/kernel   [D, H, Dh]    (embed, heads, head_dim)     bias [H, Dh]  (qkv_bias)
  layers_{i}/attn/k_proj/kernel   [D, K, Dh]    (embed, kv_heads, head_dim)  bias [K, Dh]  (qkv_bias)
  layers_{i}/attn/v_proj/kernel   [D, K, Dh]    (embed, kv_heads, head_dim)  bias [K, Dh]  (qkv_bias)
  layers_{i}/attn/o_proj/kernel   [H, Dh, D]    (heads, head_dim, embed)
  layers_{i}/attn/q_norm/scale    [Dh]          (norm,)                      (qk_norm)
  layers_{i}/attn/k_norm/scale    [Dh]          (norm,)                      (qk_norm)
  layers_{i}/mlp_norm/scale       [D]           (norm,)
  layers_{i}/mlp/gate_proj/kernel [D, F]        (embed, mlp)
  layers_{i}/mlp/up_proj/kernel   [D, F]        (embed, mlp)
  layers_{i}/mlp/down_proj/kernel [F, D]        (mlp, embed)
  final_norm/scale                [D]           (norm,)
  lm_head/kernel                  [D, V]        (embed, vocab)               (absent when tie_word_embeddings)

Shapes: B batch, T tokens in the call, D hidden_size, H num_heads, K num_kv_heads, Dh head_dim,
F intermediate_size, V vocab_size, M cache max_len, N num_layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax import checks
from stepjax.models.attention import cached_attention, causal_attention

Array = Any

# Logical axis names of the KV cache arrays k / v [N, B, M, K, Dh]; the layer axis is never sharded.
CACHE_AXES = (None, "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
_EMBED_ACT = ("activation_batch", "activation_length", "activation_embed")

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1-style ("llama3") frequency-dependent RoPE scaling."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer. Frozen and hashable (usable as a jit static arg).

  `dtype` is the compute dtype (activations, KV cache), `param_dtype` the storage dtype of parameters.
  `remat`: False, True (save nothing) or the name of a `jax.checkpoint_policies` policy.
  `scan_layers`: layers run under `nn.scan`; params then carry a leading `layers` axis.
  `attention_block`: query rows per block of the cache-free causal attention (`attention.causal_attention`; 0: one
  block, the plain form). Changes speed, compile time and float rounding only: on a 2-core CPU 32-row blocks make
  forward + backward 2.5-3x faster from T = 128 up (benchmarks/attention.py) but compile one einsum pair per block,
  so the default stays plain and the experiment presets set 32 where contexts are long.
  """

  vocab_size: int = 512
  hidden_size: int = 128
  intermediate_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 2048
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: bool | str = False
  scan_layers: bool = False
  initializer_range: float = 0.02
  attention_block: int = 0

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **overrides) -> "ModelConfig":
    fields = [f.name for f in dataclasses.fields(self)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
      raise ValueError(f"{unknown[0]}: not a ModelConfig field (fields: {', '.join(fields)})")
    return dataclasses.replace(self, **overrides)

  def validate(self) -> "ModelConfig":
    """Raises ValueError with one line naming the field; returns self so it chains."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings"):
      checks.check_int(getattr(self, name), name, 1)
    checks.check_int(self.attention_block, "attention_block", 0)
    if self.num_heads % self.num_kv_heads:
      checks.fail("num_heads", f"must be divisible by num_kv_heads={self.num_kv_heads}, got {self.num_heads}")
    if self.head_dim % 2:
      checks.fail("head_dim", f"must be even (RoPE rotates pairs), got {self.head_dim}")
    checks.check_number(self.rope_theta, "rope_theta", lambda v: v > 0, "> 0")
    checks.check_number(self.rms_norm_eps, "rms_norm_eps", lambda v: v > 0, "> 0")
    for name in ("dtype", "param_dtype"):
      try:
        floating = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        raise ValueError(f"{name}: must be a floating dtype (float32, bfloat16, float16), got {getattr(self, name)!r}")
    if not isinstance(self.remat, bool) and self.remat not in _remat_policy_names():
      raise ValueError(f"remat: must be a bool or one of {', '.join(_remat_policy_names())}, got {self.remat!r}")
    if self.rope_scaling is not None:
      s = self.rope_scaling
      if not isinstance(s, RopeScaling):
        raise ValueError(f"rope_scaling: must be a RopeScaling or None, got {type(s).__name__}")
      if not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor and s.original_max_position_embeddings > 0):
        raise ValueError(f"rope_scaling: needs factor > 0, 0 < low_freq_factor < high_freq_factor, got {s}")
    return self


def _remat_policy_names() -> list[str]:
  """`jax.checkpoint_policies` usable by name (the ones that need no arguments)."""
  names = ("nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
           "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")
  return [n for n in names if hasattr(jax.checkpoint_policies, n)]


_PRESETS: dict[str, ModelConfig] = {
    # Tests: a byte tokenizer (256) plus specials fits in 512.
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=2048),
    # CPU experiments: about 3.4M parameters.
    "small": ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=32, max_position_embeddings=4096),
    # Real shapes, from the public Hugging Face config.json files.
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=8192, dtype="bfloat16"),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
                                dtype="bfloat16"),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                              num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              qkv_bias=True, max_position_embeddings=131072, dtype="bfloat16"),
    "qwen3-0.6b": ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                              num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
                              dtype="bfloat16"),
    "qwen3-8b": ModelConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            qk_norm=True, max_position_embeddings=40960, dtype="bfloat16"),
}


PRESETS: tuple[str, ...] = tuple(_PRESETS)  # the preset names, in the order above


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset (`tiny`, `small`, `llama3-8b`, `qwen2.5-0.5b`, `qwen2.5-7b`, `qwen3-0.6b`, `qwen3-8b`) with overrides."""
  checks.check_choice(name, "model.preset", PRESETS)
  return _PRESETS[name].replace(**overrides).validate()


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class KVCache:
  """Per-row ragged KV cache.

    k, v     [N, B, M, K, Dh]  compute dtype; slot s of row b holds the token at RoPE position s.
    lengths  [B] int32         tokens already in the cache per row (slots >= lengths[b] are stale / free).
  """

  k: Array
  v: Array
  lengths: Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache (lengths 0) for `batch_size` rows of up to `max_len` tokens, in the compute dtype."""
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch_size,), jnp.int32))


def cache_logical_axes() -> KVCache:
  """The logical axis names of each KVCache field, as a KVCache of PartitionSpecs (for `logical_to_mesh_sharding`)."""
  spec = jax.sharding.PartitionSpec
  return KVCache(k=spec(*CACHE_AXES), v=spec(*CACHE_AXES), lengths=spec("cache_batch"))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _normal(stddev: float):
  return nn.initializers.normal(stddev)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised over the last axis in float32."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
  """A linear map as one einsum over a multi-axis kernel, with an optional bias over the output axes."""

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...] | None  # None: no bias; else the trailing output axes of the kernel
  dtype: Any
  param_dtype: Any
  stddev: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(_normal(self.stddev), self.kernel_axes),
                        self.kernel_shape, self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.bias_axes is not None:
      bias_shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_axes):]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes), bias_shape,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Array:
  """[Dh/2] float32 inverse frequencies theta^(-2i/Dh), optionally with Llama-3.1 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, and the band in between interpolated smoothly.
  low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates x [B, T, n, Dh] by positions [B, T] in the HF "rotate_half" layout (first half paired with second)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE, optional q/k/v bias and per-head q/k RMSNorm."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, layer_cache: tuple | None, cache_slots: Array | None):
    """x [B, T, D], positions [B, T]. Without a cache: causal attention over the call's tokens (`causal_attention`
    in query blocks of `config.attention_block`).

    layer_cache: None, or (k_all, v_all, layer) with k_all/v_all the whole [N, B, M, K, Dh] cache and `layer`
    this layer's index; the T new keys/values are written at cache_slots [B, T] of row b and token t then attends
    to this layer's slots <= cache_slots[b, t] (`cached_attention`). Returns (out [B, T, D], layer_cache with the
    new entries written).
    """
    c = self.config
    dtype, pdtype, std = c.compute_dtype, c.storage_dtype, c.initializer_range
    d, h, k, dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    bias = lambda axes: axes if c.qkv_bias else None
    q = Projection("btd,dhk->bthk", (d, h, dh), ("embed", "heads", "head_dim"), bias(("heads", "head_dim")),
                   dtype, pdtype, std, name="q_proj")(x)
    key = Projection("btd,dhk->bthk", (d, k, dh), ("embed", "kv_heads", "head_dim"), bias(("kv_heads", "head_dim")),
                     dtype, pdtype, std, name="k_proj")(x)
    value = Projection("btd,dhk->bthk", (d, k, dh), ("embed", "kv_heads", "head_dim"), bias(("kv_heads", "head_dim")),
                       dtype, pdtype, std, name="v_proj")(x)
    if c.qk_norm:  # Qwen3: normalise each head's q and k before RoPE
      q = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="q_norm")(q)
      key = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="k_norm")(key)
    inv_freq = rope_inverse_frequencies(dh, c.rope_theta, c.rope_scaling)
    q = apply_rope(q, positions, inv_freq)
    key = apply_rope(key, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
    key = nn.with_logical_constraint(key, ("activation_batch", "activation_length", "activation_kv_heads", None))
    value = nn.with_logical_constraint(value, ("activation_batch", "activation_length", "activation_kv_heads", None))

    b, t = q.shape[:2]
    if layer_cache is None:
      out = causal_attention(q, key, value, c.attention_block)
    else:
      k_all, v_all, layer = layer_cache
      rows = jnp.arange(b)[:, None]
      # Scatter, not dynamic_update_slice: slots past M are dropped instead of being clamped onto live slots.
      # Written before the read (in place on a donated / loop-carried cache), so the chunk attends through it.
      k_all = k_all.at[layer, rows, cache_slots].set(key.astype(k_all.dtype), mode="drop")
      v_all = v_all.at[layer, rows, cache_slots].set(value.astype(v_all.dtype), mode="drop")
      layer_cache = (k_all, v_all, layer)
      out = cached_attention(q, k_all, v_all, layer, cache_slots).astype(dtype)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    out = Projection("bthk,hkd->btd", (h, dh, d), ("heads", "head_dim", "embed"), None, dtype, pdtype, std,
                     name="o_proj")(out)
    return out, layer_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    args = (c.compute_dtype, c.storage_dtype, c.initializer_range)
    d, f = c.hidden_size, c.intermediate_size
    gate = Projection("btd,df->btf", (d, f), ("embed", "mlp"), None, *args, name="gate_proj")(x)
    up = Projection("btd,df->btf", (d, f), ("embed", "mlp"), None, *args, name="up_proj")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return Projection("btf,fd->btd", (f, d), ("mlp", "embed"), None, *args, name="down_proj")(hidden)


class Block(nn.Module):
  """Pre-norm decoder layer. Call signature fits `nn.scan`: (carry, *broadcast) -> (carry, None).

  carry = (x [B, T, D], layer_cache): layer_cache None or (k_all, v_all, layer index int32 scalar).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, carry, positions: Array, cache_slots: Array | None):
    c = self.config
    x, layer_cache = carry
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, c.storage_dtype, name=name)
    attn_out, layer_cache = Attention(c, name="attn")(norm("attn_norm")(x), positions, layer_cache, cache_slots)
    x = nn.with_logical_constraint(x + attn_out, _EMBED_ACT)
    x = nn.with_logical_constraint(x + MLP(c, name="mlp")(norm("mlp_norm")(x)), _EMBED_ACT)
    if layer_cache is not None:
      k_all, v_all, layer = layer_cache
      layer_cache = (k_all, v_all, layer + 1)
    return (x, layer_cache), None


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives tied logits."""

  config: ModelConfig

  def setup(self):
    c = self.config
    self.embedding = self.param("embedding", nn.with_logical_partitioning(_normal(c.initializer_range),
                                                                          ("vocab", "embed")),
                                (c.vocab_size, c.hidden_size), c.storage_dtype)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)

  def attend(self, hidden: Array) -> Array:
    """hidden [B, T, D] -> logits [B, T, V] float32."""
    emb = self.embedding.astype(self.config.compute_dtype)
    return jnp.einsum("btd,vd->btv", hidden, emb, preferred_element_type=jnp.float32)


def _block_class(config: ModelConfig):
  block = Block
  if config.remat:
    policy = None if config.remat is True else getattr(jax.checkpoint_policies, config.remat)
    # prevent_cse is only needed outside scan (scan already stops XLA from merging the recomputation).
    block = nn.remat(block, policy=policy, prevent_cse=not config.scan_layers)
  return block


class Transformer(nn.Module):
  """Decoder-only LM. `__call__(tokens, positions=None, cache=None, chunk_lengths=None)`."""

  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed = Embed(c)
    block = _block_class(c)
    if c.scan_layers:
      self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [block(c) for _ in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype, c.storage_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Projection("btd,dv->btv", (c.hidden_size, c.vocab_size), ("embed", "vocab"), None,
                                c.compute_dtype, c.storage_dtype, c.initializer_range)

  def trunk(self, tokens: Array, positions: Array | None = None, cache: KVCache | None = None,
            chunk_lengths: Array | None = None) -> tuple[Array, KVCache | None]:
    """tokens [B, T] -> (final-normed hidden [B, T, D] in the compute dtype, new cache or None)."""
    b, t = tokens.shape
    steps = jnp.arange(t, dtype=jnp.int32)
    if cache is None:
      cache_slots = None
      layer_cache = None
    else:
      cache_slots = cache.lengths.astype(jnp.int32)[:, None] + steps  # [B, T]: slot == RoPE position
      k_all = nn.with_logical_constraint(cache.k, CACHE_AXES)
      v_all = nn.with_logical_constraint(cache.v, CACHE_AXES)
      layer_cache = (k_all, v_all, jnp.zeros((), jnp.int32))
    if positions is None:
      positions = jnp.broadcast_to(steps, (b, t)) if cache is None else cache_slots

    x = nn.with_logical_constraint(self.embed(tokens), _EMBED_ACT)
    carry = (x, layer_cache)
    if self.config.scan_layers:
      carry, _ = self.layers(carry, positions, cache_slots)
    else:
      for layer in self.layers:
        carry, _ = layer(carry, positions, cache_slots)
    x, layer_cache = carry
    hidden = nn.with_logical_constraint(self.final_norm(x), _EMBED_ACT)

    new_cache = None
    if cache is not None:
      if chunk_lengths is None:
        chunk_lengths = jnp.full((b,), t, jnp.int32)
      new_cache = KVCache(k=layer_cache[0], v=layer_cache[1],
                          lengths=cache.lengths + jnp.asarray(chunk_lengths, jnp.int32))
    return hidden, new_cache

  def logits(self, hidden: Array) -> Array:
    """hidden [B, T, D] -> logits [B, T, V] float32."""
    if self.config.tie_word_embeddings:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden).astype(jnp.float32)
    return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(self, tokens: Array, positions: Array | None = None, cache: KVCache | None = None,
               chunk_lengths: Array | None = None):
    """tokens [B, T] int -> (logits [B, T, V] float32, hidden [B, T, D], new_cache | None).

    Without a cache: positions default to arange(T); causal attention (right padding needs no mask).
    With a cache: token i of row b goes to slot cache.lengths[b] + i (= its default RoPE position), attends
    to slots <= that, and new_cache.lengths = cache.lengths + chunk_lengths (default T). A padded tail is
    written but not counted, so the next call overwrites it.
    """
    hidden, new_cache = self.trunk(tokens, positions, cache, chunk_lengths)
    return self.logits(hidden), hidden, new_cache


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def _as_module(model_or_config) -> nn.Module:
  return Transformer(model_or_config) if isinstance(model_or_config, ModelConfig) else model_or_config


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init(model: nn.Module, key: Array) -> dict:
  return nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def init_params(model_or_config, key: Array) -> dict:
  """Fresh unboxed params for a module (or a ModelConfig -> Transformer), on the default device.

  Jitted (and cached per module) because eager init dispatches one RNG program per parameter shape. For a sharded
  init, jit `model.init` yourself with `out_shardings` from `param_logical_axes` + the logical rules.
  """
  return _jitted_init(_as_module(model_or_config), key)


def param_logical_axes(model_or_config) -> dict:
  """A pytree of PartitionSpecs of logical axis names matching the params (no arrays are allocated)."""
  model = _as_module(model_or_config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return nn.get_partition_spec(boxed)


def forward(config: ModelConfig, params: dict, tokens: Array, positions: Array | None = None,
            cache: KVCache | None = None, chunk_lengths: Array | None = None):
  """Pure `Transformer(config).apply`: -> (logits [B, T, V] float32, hidden [B, T, D], new_cache | None)."""
  return Transformer(config).apply({"params": params}, tokens, positions, cache, chunk_lengths)


def stack_layer_params(params: dict, num_layers: int) -> dict:
  """Plain-stack layout {layers_0 .. layers_{N-1}} -> scan layout {layers: leaves with a leading [N] axis}."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
  return out


def unstack_layer_params(params: dict) -> dict:
  """Scan layout -> plain-stack layout (inverse of `stack_layer_params`)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
