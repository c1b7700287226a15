"""The cache-free causal attention in query blocks against the plain [T, T] form, forward and forward + backward.

`stepjax.models.attention.causal_attention(q, k, v, block)` with block 0 is the plain form: one [T, T] score matrix
per head, the upper triangle masked. Blocked, query block i reads only keys [0, end of block i). Shapes are those of
the lookup_qa preset's update (16 episodes a minibatch, 4 query heads sharing 2 kv heads of 16 dims); the
experiment presets use block 32 (`ModelConfig.attention_block`, whose library default 0 is the plain form). Median of repeated runs after a warm-up; the ratio is plain
time / blocked time (> 1: the blocked form is faster).

    python -m benchmarks.attention [--repeats 10] [--batch 16] [--lengths 128,256,512] [--markdown out.md]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit, median_seconds  # noqa: E402
from stepjax.models.attention import causal_attention  # noqa: E402

BLOCKS = (0, 16, 32, 64, 128)


def main(argv=None):
  parser = arg_parser(__doc__, repeats=10)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lengths", default="128,256,512")
  args = parser.parse_args(argv)
  heads, kv_heads, head_dim = 4, 2, 16
  lines = [f"causal_attention, batch {args.batch}, {heads} query heads / {kv_heads} kv heads x {head_dim}, float32, "
           f"median of {args.repeats}, {jax.devices()[0].platform} (ms; ratio = plain / blocked)", "",
           "| T | block | forward ms | ratio | forward + backward ms | ratio |", "|---:|---:|---:|---:|---:|---:|"]
  for length in (int(v) for v in args.lengths.split(",")):
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (args.batch, length, heads, head_dim))
    k, v = (jax.random.normal(key, (args.batch, length, kv_heads, head_dim)) for key in keys[1:3])
    plain = None
    for block in BLOCKS:
      if block >= length:
        continue
      forward = jax.jit(lambda q, k, v, block=block: causal_attention(q, k, v, block))
      grad = jax.jit(jax.grad(lambda q, k, v, block=block: jnp.sum(causal_attention(q, k, v, block) ** 2),
                              argnums=(0, 1, 2)))
      times = (median_seconds(lambda: jax.block_until_ready(forward(q, k, v)), args.repeats)[0],
               median_seconds(lambda: jax.block_until_ready(grad(q, k, v)), args.repeats)[0])
      plain = plain or times
      lines.append(f"| {length} | {block or 'plain'} | {1e3 * times[0]:.1f} | {plain[0] / times[0]:.2f} | "
                   f"{1e3 * times[1]:.1f} | {plain[1] / times[1]:.2f} |")
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
