"""One-host accelerator benchmark: sampler throughput and HBM bandwidth, update throughput and MFU, one RL iteration.

With random weights (no checkpoint is read) of a model in bf16 (compute and parameter dtype):

  --size 0.5b   the Qwen2.5-0.5B shape (`transformer.get_config("qwen2.5-0.5b")`: 24 layers, 896 wide, 14 / 2 heads,
                vocab 151,936, tied embeddings), scanned layers, full remat in training. The default on a GPU/TPU.
  --size tiny   the `tiny` preset (2 layers, 128 wide, vocab 512) and tiny batches: a smoke test, the default on CPU
                (tests/test_device_benchmark.py runs it).

It measures, each as the median of --repeats timed runs after a warm-up run (which also compiles):

  prefill     `sampling.prefill` of B prompts of T tokens into an empty KV cache: B x T / s.
  decode      `sampling.decode` of N new tokens per row (greedy, no stop token, so every row runs all N) from the
              prefilled cache: B x N / s. Achieved bandwidth = bytes read per decode step / step time, where a step
              reads every parameter once plus the keys and values attended (all layers, B rows, the mean context
              T + N/2, rounded up to the 128-slot blocks `cached_attention` reads); as a fraction of the device's
              peak HBM bandwidth.
  update      one `train.make_update` call (step GAE, GSPO, a separate critic of the policy's shape; epochs 1 x M
              minibatches) on a packed random EpisodeBatch of B rows x L tokens: B x L / s. MFU = model FLOPs / s /
              peak bf16 FLOP/s, model FLOPs = 6 x (policy + critic matmul parameters) x tokens (forward + backward)
              + 2 x critic parameters x tokens (the critic forward of `prepare`) + causal attention (2 x layers x
              heads x head_dim x L^2 per row and forward, x3 with the backward); remat recomputation is not counted.
  iteration   one fused RL iteration (`train.make_train_iteration`: rollout + update, jitted) on lookup_qa in the
              preset's 2-hop think regime (experiments/configs/presets.py) with the StepPO config and this model:
              s / iteration and environment (agent) steps / s. Random weights rarely stop early, so episodes run
              near their step and token budgets: a worst case for the rollout.

Peaks come from the vendors' datasheets (NVIDIA H100 / H200 / A100 / L4 datasheets, dense bf16 tensor-core FLOP/s
without sparsity; Google Cloud TPU system-architecture pages, per chip); an unknown device kind prints n/a.

    python -m benchmarks.device [--size tiny|0.5b] [--repeats 3] [--markdown out.md]
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit, median_seconds  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.configs import steppo  # noqa: E402
from stepjax import sampling, train  # noqa: E402
from stepjax.models import Transformer, init_cache, transformer  # noqa: E402
from stepjax.models.value import ValueConfig  # noqa: E402
from stepjax.testing import random_episode_batch  # noqa: E402
from stepjax.train.config import OptimConfig, UpdateConfig  # noqa: E402
from stepjax.train.optim import CRITIC  # noqa: E402

# (name, substrings that must all appear in device_kind (lower case), substrings that must not, peak HBM bytes/s,
# peak dense bf16 FLOP/s). Vendor datasheets; checked in this order (H200 before H100, v5 lite before v5p).
PEAKS = (
    ("H200", ("h200",), (), 4.8e12, 989e12),
    ("H100 SXM", ("h100",), ("pcie", "nvl"), 3.35e12, 989e12),
    ("A100 80GB", ("a100", "80g"), ("pcie",), 2.0e12, 312e12),
    ("A100 40GB", ("a100", "40g"), ("pcie",), 1.56e12, 312e12),
    ("L4", ("l4",), (), 0.3e12, 121e12),
    ("TPU v4", ("tpu v4",), ("lite",), 1.2e12, 275e12),
    ("TPU v5e", ("tpu v5", "lite"), (), 0.82e12, 197e12),
    ("TPU v5e", ("tpu v5e",), (), 0.82e12, 197e12),
    ("TPU v5p", ("tpu v5",), ("lite",), 2.76e12, 459e12),
    ("TPU v6e", ("tpu v6",), (), 1.64e12, 918e12),
)


@dataclasses.dataclass(frozen=True)
class Size:
  model: transformer.ModelConfig
  gen_batch: int  # prefill / decode rows
  prompt_len: int
  new_tokens: int
  update_batch: int  # update rows x tokens
  update_len: int
  minibatches: int
  num_tasks: int  # lookup_qa iteration: num_tasks x episodes_per_task episodes
  episodes_per_task: int
  epochs: int


def size_config(name: str) -> Size:
  bf16 = {"dtype": "bfloat16", "param_dtype": "bfloat16"}
  if name == "tiny":
    return Size(model=transformer.get_config("tiny", scan_layers=True, **bf16), gen_batch=4, prompt_len=32,
                new_tokens=16, update_batch=4, update_len=64, minibatches=1, num_tasks=2, episodes_per_task=2, epochs=1)
  if name == "0.5b":
    model = transformer.get_config("qwen2.5-0.5b", scan_layers=True, remat=True, attention_block=256, **bf16)
    return Size(model=model, gen_batch=32, prompt_len=1024, new_tokens=128, update_batch=32, update_len=1024,
                minibatches=4, num_tasks=8, episodes_per_task=4, epochs=1)
  raise ValueError(f"--size: unknown {name!r}; allowed: tiny, 0.5b")


def device_peaks(kind: str) -> tuple[str | None, float | None, float | None]:
  """(table name, peak bytes/s, peak bf16 FLOP/s) for a `device_kind`, or Nones when it is not in PEAKS."""
  k = kind.lower()
  for name, need, avoid, bandwidth, flops in PEAKS:
    if all(s in k for s in need) and not any(s in k for s in avoid):
      return name, bandwidth, flops
  return None, None, None


def tree_bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def matmul_params(config: transformer.ModelConfig, total: int, lm_head: bool) -> int:
  """Parameters that take part in a matmul per token: all but the embedding lookup, plus the LM head (V x D)."""
  vd = config.vocab_size * config.hidden_size
  if lm_head:
    return total if config.tie_word_embeddings else total - vd
  return total - vd


def attention_flops(config: transformer.ModelConfig, rows: int, length: int) -> float:
  """Forward FLOPs of causal attention (QK^T and PV, half the square): 2 x 2 x layers x H x Dh x L^2 / 2 per row."""
  return 2.0 * config.num_layers * config.num_heads * config.head_dim * length * length * rows


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def bench_sampler(size: Size, repeats: int) -> dict:
  config = size.model
  model = Transformer(config)
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.key(0))
  b, t, n = size.gen_batch, size.prompt_len, size.new_tokens
  max_len = t + n
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (b, t)), jnp.int32)
  lengths = jnp.full((b,), t, jnp.int32)
  cfg = sampling.SamplingConfig(max_new_tokens=n, greedy=True)

  @jax.jit
  def prefill(params, prompts):
    return sampling.prefill(model, params, prompts, lengths, init_cache(config, b, max_len))

  @jax.jit
  def decode(params, cache, logits):
    out = sampling.decode(model, params, cache, logits, jax.random.key(0), cfg)
    return out.tokens, out.lengths

  cache, logits = prefill(params, prompts)
  t_prefill, _ = median_seconds(lambda: jax.block_until_ready(prefill(params, prompts)), repeats)
  t_decode, _ = median_seconds(lambda: jax.block_until_ready(decode(params, cache, logits)), repeats)
  generated = int(jnp.sum(decode(params, cache, logits)[1]))
  assert generated == b * n, (generated, b * n)  # every row decoded all N tokens
  itemsize = jnp.dtype(config.dtype).itemsize
  mean_context = t + n / 2
  attended = min(max_len, math.ceil(mean_context / 128) * 128)
  kv_bytes = 2 * config.num_layers * b * attended * config.num_kv_heads * config.head_dim * itemsize
  param_bytes = tree_bytes(params)
  step_s = t_decode / n
  return {"prefill_s": t_prefill, "prefill_tok_s": b * t / t_prefill, "decode_s": t_decode,
          "decode_tok_s": b * n / t_decode, "step_ms": 1e3 * step_s, "param_bytes": param_bytes,
          "kv_bytes": kv_bytes, "bandwidth": (param_bytes + kv_bytes) / step_s, "params": tree_count(params)}


# --------------------------------------------------------------------------------------------------
# Update
# --------------------------------------------------------------------------------------------------


def update_configs(size: Size, epochs: int = 1, minibatches: int | None = None) -> tuple[UpdateConfig, OptimConfig]:
  """StepPO's method (step GAE, GSPO, separate critic, step whitening) as experiments/configs/steppo.py sets it."""
  uc = runner.build(steppo.get_config()).update_config
  uc = dataclasses.replace(uc, value=ValueConfig(kind="separate"), epochs=epochs,
                           minibatches=size.minibatches if minibatches is None else minibatches)
  return uc, OptimConfig()


def bench_update(size: Size, repeats: int) -> dict:
  config = size.model
  uc, oc = update_configs(size)
  b, length = size.update_batch, size.update_len
  batch = random_episode_batch(0, b, length, 8, vocab_size=config.vocab_size, max_prompt=length // 4,
                               max_action=length // 16, max_obs=length // 16, fill=True)
  batch = jax.tree.map(jnp.asarray, batch)
  update = train.make_update(config, uc, oc)
  holder = {"state": train.init_train_state(config, uc, oc, jax.random.key(1))}
  policy_total = tree_count(holder["state"].params["policy"])
  critic_total = tree_count(holder["state"].params[CRITIC])

  def run():
    holder["state"], metrics = update(holder["state"], batch)
    jax.block_until_ready((holder["state"].params, metrics))
    holder["metrics"] = metrics

  t_update, _ = median_seconds(run, repeats)
  tokens = b * length
  n_policy = matmul_params(config, policy_total, lm_head=True)
  n_critic = matmul_params(config, critic_total, lm_head=False)
  attn = attention_flops(config, b, length)
  flops = uc.epochs * (6.0 * (n_policy + n_critic) * tokens + 3 * 2 * attn) + 2.0 * n_critic * tokens + attn
  loss = float(holder["metrics"]["loss"])
  assert math.isfinite(loss), loss
  return {"update_s": t_update, "update_tok_s": tokens / t_update, "flops": flops, "flop_s": flops / t_update,
          "policy_params": policy_total, "critic_params": critic_total}


# --------------------------------------------------------------------------------------------------
# One RL iteration on lookup_qa
# --------------------------------------------------------------------------------------------------


def bench_iteration(size: Size, repeats: int) -> dict:
  config = steppo.get_config()  # lookup_qa, the preset's 2-hop think regime (max_len 256)
  config.rollout.num_tasks, config.rollout.episodes_per_task = size.num_tasks, size.episodes_per_task
  config.algo.epochs = size.epochs
  setup = runner.build(config)
  env_model = setup.model_config
  if size.model.vocab_size < env_model.vocab_size:
    raise ValueError(f"model vocab {size.model.vocab_size} < the tokenizer's {env_model.vocab_size}")
  mc = size.model.replace(max_position_embeddings=max(size.model.max_position_embeddings,
                                                      env_model.max_position_embeddings)).validate()
  uc, oc, rc = setup.update_config, setup.optim_config, setup.rollout_config
  uc = dataclasses.replace(uc, minibatches=min(uc.minibatches, rc.batch_size))
  iteration = jax.jit(train.make_train_iteration(mc, setup.env, rc, uc, oc), donate_argnums=0)
  holder = {"state": train.init_train_state(mc, uc, oc, jax.random.key(3)), "steps": []}

  def run():
    holder["state"], metrics = iteration(holder["state"], setup.env_params)
    holder["steps"].append(float(jax.block_until_ready(metrics)["agent_steps"]))
    holder["metrics"] = metrics

  t_iter, _ = median_seconds(run, repeats)
  steps = float(np.mean(holder["steps"][1:] or holder["steps"]))  # the timed iterations
  return {"iteration_s": t_iter, "env_steps": steps, "env_steps_s": steps / t_iter, "episodes": rc.batch_size,
          "max_len": rc.max_len, "max_steps": rc.max_steps, "epochs": uc.epochs, "minibatches": uc.minibatches,
          "context_len": float(holder["metrics"]["context_len"])}


# --------------------------------------------------------------------------------------------------


def _fraction(value: float, peak: float | None) -> str:
  return "n/a" if peak is None else f"{value / peak:.1%}"


def main(argv=None):
  parser = arg_parser(__doc__, repeats=3)
  parser.add_argument("--size", choices=["tiny", "0.5b"], default=None,
                      help="model and batch sizes (default: 0.5b on a GPU/TPU, tiny on CPU)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  size_name = args.size or ("tiny" if jax.default_backend() == "cpu" else "0.5b")
  size = size_config(size_name)
  kind = device.device_kind
  peak_name, peak_bw, peak_flops = device_peaks(kind)
  print(f"jax {jax.__version__}, {device.platform} device {kind!r} (peaks: {peak_name or 'unknown'}), size "
        f"{size_name}", flush=True)
  gen = bench_sampler(size, args.repeats)
  upd = bench_update(size, args.repeats)
  it = bench_iteration(size, args.repeats)
  c = size.model
  peaks = (f"peak {peak_bw / 1e12:.2f} TB/s, {peak_flops / 1e12:.0f} TFLOP/s bf16 dense ({peak_name}, vendor "
           "datasheet)" if peak_name else "peaks unknown for this device kind: fractions n/a")
  lines = [
      f"Device benchmark, size {size_name}: `{kind}` ({device.platform}, {jax.device_count()} device(s), using 1), "
      f"jax {jax.__version__}; {peaks}. Random weights, bf16, {gen['params'] / 1e6:.1f}M policy parameters "
      f"({c.num_layers} layers x {c.hidden_size}, vocab {c.vocab_size}); median of {args.repeats} after a warm-up.",
      "",
      "| measurement | setting | median s | throughput | of peak |",
      "|---|---|---:|---:|---:|",
      f"| prefill | B={size.gen_batch} x T={size.prompt_len} prompt tokens | {gen['prefill_s']:.4f} | "
      f"{gen['prefill_tok_s']:.0f} tokens/s | |",
      f"| decode | B={size.gen_batch} x {size.new_tokens} new tokens, KV cache | {gen['decode_s']:.4f} | "
      f"{gen['decode_tok_s']:.0f} tokens/s | |",
      f"| decode memory bandwidth | ({gen['param_bytes'] / 1e6:.1f} MB params + {gen['kv_bytes'] / 1e6:.1f} MB KV) "
      f"/ {gen['step_ms']:.3f} ms step | {gen['step_ms'] / 1e3:.6f} | {gen['bandwidth'] / 1e9:.2f} GB/s | "
      f"{_fraction(gen['bandwidth'], peak_bw)} |",
      f"| update (policy + critic) | B={size.update_batch} x L={size.update_len} packed, 1 epoch x "
      f"{size.minibatches} minibatches | {upd['update_s']:.4f} | "
      f"{size.update_batch * size.update_len / upd['update_s']:.0f} tokens/s | |",
      f"| update MFU | {upd['flops'] / 1e12:.3f} TFLOP model FLOPs per update | {upd['update_s']:.4f} | "
      f"{upd['flop_s'] / 1e12:.3f} TFLOP/s | {_fraction(upd['flop_s'], peak_flops)} |",
      f"| RL iteration, lookup_qa | {it['episodes']} episodes (max_len {it['max_len']}, <= {it['max_steps']} steps), "
      f"{it['epochs']} epoch(s) x {it['minibatches']} minibatches | {it['iteration_s']:.4f} | "
      f"{1 / it['iteration_s']:.3f} iterations/s | |",
      f"| RL iteration, env steps | {it['env_steps']:.0f} agent steps / iteration (mean context "
      f"{it['context_len']:.0f} tokens) | {it['iteration_s']:.4f} | {it['env_steps_s']:.1f} env steps/s | |",
  ]
  emit(lines, args.markdown)
  return {"size": size_name, "device_kind": kind, "sampler": gen, "update": upd, "iteration": it, "lines": lines}


if __name__ == "__main__":
  main()
