"""Attention kernels of the transformer, written for what a 2-core CPU and an accelerator both do well.

* `causal_attention(q, k, v, block)`: training and scoring forwards (no cache). Queries go in blocks of `block`
  rows; block i attends to keys [0, end of block i) only, so the upper triangle beyond the diagonal block is never
  computed (about half the scores at many blocks). Exact (the skipped scores are the masked ones); differentiable.
* `cached_attention(q, k_all, v_all, layer, slots)`: decoding and cache extension, an online softmax over key
  blocks read straight from the stacked KV cache up to the highest slot any row reads. Not reverse-differentiable.

Shapes: B batch, T query tokens, H query heads, K kv heads (G = H / K query heads share one), Dh head dim,
M cache slots, N layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def causal_attention(q: Array, key: Array, value: Array, block: int = 32) -> Array:
  """Causal grouped-query attention: q [B, T, H, Dh], key / value [B, T, K, Dh] -> [B, T, H, Dh] in q's dtype.

  Token t attends to tokens <= t (right padding needs no mask: padded tokens come after every real one). Scores
  and the softmax are float32. block: query rows per block (<= 0 or >= T: one block, the plain [T, T] form).
  Why blocks: measured on a 2-core CPU (forward + backward, B 16, T 256, K 2, G 2, Dh 16), 32-row blocks take
  about a third of the plain form's time, more than the halved score count alone: each block's [T_b, S] scores stay
  in cache between the passes of the softmax and its gradient (benchmarks/attention.py).
  """
  b, t, h, dh = q.shape
  kh = key.shape[2]
  qg = q.reshape(b, t, kh, h // kh, dh)  # query heads grouped by the kv head they share
  scale = 1.0 / np.sqrt(dh)
  block = t if block <= 0 else min(block, t)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg[:, start:end], key[:, :end], preferred_element_type=jnp.float32)
    visible = np.arange(start, end)[:, None] >= np.arange(end)[None, :]  # [T_b, S] (static)
    scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, value[:, :end]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out.reshape(b, t, h, dh)


def cached_attention(q: Array, k_all: Array, v_all: Array, layer: Array | int, cache_slots: Array,
                     block_size: int | None = None) -> Array:
  """Attention of q [B, T, H, Dh] over layer `layer` of the cache k_all / v_all [N, B, M, K, Dh] -> [B, T, H, Dh] f32.

  Token t of row b sees slots <= cache_slots[b, t]. Why blocked: on CPU the plain version is bound by memory
  traffic, not MACs (copying a whole layer out of the stacked cache, transposing it, and several passes over a
  materialised [B, K, G, T, M] score tensor). Here keys/values are read in blocks of `block_size` slots straight from
  the stacked cache with an online softmax, and only up to the highest slot any row reads (a loop with a
  data-dependent trip count), so a half-empty cache costs about half and each block's scores stay cache-sized.
  Not reverse-differentiable (dynamic trip count); training forwards run without a cache.
  """
  b, t, h, dh = q.shape
  m, kh = k_all.shape[2], k_all.shape[3]
  g = h // kh
  if block_size is None:
    # Measured on a 2-core CPU: decode (G*T small) is fastest with 128-slot blocks (fewer loop steps, tiny scores);
    # long chunks (extend / prefill) with 32 (their [B, K, G*T, S] scores then stay in cache between passes).
    block_size = 128 if g * t <= 64 else 32
  s = min(block_size, m)
  qg = q.reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  scale = 1.0 / np.sqrt(dh)
  neg = jnp.finfo(jnp.float32).min
  limit = cache_slots[:, None, None, :, None]  # [B, 1, 1, T, 1]

  def body(j, carry):
    mx, l, acc = carry
    start = jnp.minimum(j * s, m - s)  # the last block is clamped to end at M; its slots before j * s are done
    kb = jax.lax.dynamic_slice(k_all, (layer, 0, start, 0, 0), (1, b, s, kh, dh))[0]
    vb = jax.lax.dynamic_slice(v_all, (layer, 0, start, 0, 0), (1, b, s, kh, dh))[0]
    slots = start + jnp.arange(s, dtype=jnp.int32)
    visible = (slots >= j * s) & (slots <= limit)  # [B, 1, 1, T, S]
    sc = jnp.einsum("bkgtd,bskd->bkgts", qg, kb.astype(q.dtype), preferred_element_type=jnp.float32)
    sc = jnp.where(visible, sc * scale, neg)
    m_new = jnp.maximum(mx, sc.max(-1))
    p = jnp.where(visible, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(mx - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), vb.astype(q.dtype), preferred_element_type=jnp.float32)
    return m_new, l, acc * corr[..., None] + pv

  init = (jnp.full((b, kh, g, t), neg, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, dh), jnp.float32))
  num_blocks = jnp.minimum(jnp.max(cache_slots), m - 1) // s + 1  # blocks up to the highest slot read
  _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  out = acc / l[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
