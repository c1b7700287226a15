"""Sampler and packed-forward benchmarks, side by side with their references.

1. Tokens/s of stepjax's jitted KV-cache sampler vs `transformers`' `generate` (PyTorch, CPU) on the same tiny
   Qwen2 weights: batch 16, prompt 128, 128 new tokens, greedy, KV cache in both. The greedy outputs are compared.
2. Multi-turn: 8 turns of (32 observation tokens appended + 16 action tokens decoded), cache extension vs
   re-prefilling the whole history every turn (what rebuilding the prompt for every step costs).
3. Training side: log-probs and step values of 8-step episodes from one packed forward per episode
   (`EpisodeBatch`) vs one forward per step (`StepRows`): time and tokens processed.

    python -m benchmarks.generate [--repeats 5] [--markdown out.md]
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import arg_parser, emit, median_seconds
from stepjax import sampling
from stepjax.models import PolicyWithValue, hf, init_cache
from stepjax.testing import random_episode_batch



def _tiny_qwen2(path: str):
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True, torch_dtype="float32")
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def bench_generate(repeats: int, batch=16, prompt_len=128, new_tokens=128):
  import torch

  with tempfile.TemporaryDirectory() as tmp:
    torch_model = _tiny_qwen2(tmp)
    config, params = hf.load_hf_checkpoint(tmp, dtype=jnp.float32)
  from stepjax.models import Transformer

  model = Transformer(config)
  prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt_len)).astype(np.int32)
  cfg = sampling.SamplingConfig(max_new_tokens=new_tokens, greedy=True)

  @jax.jit
  def jax_generate(params, prompts):
    cache = init_cache(config, batch, prompt_len + new_tokens)
    cache, logits = sampling.prefill(model, params, prompts, jnp.full((batch,), prompt_len, jnp.int32), cache)
    return sampling.decode(model, params, cache, logits, jax.random.key(0), cfg).tokens

  ids = torch.from_numpy(prompts.astype(np.int64))

  def torch_generate():
    with torch.no_grad():
      return torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                  eos_token_id=None)[:, prompt_len:]

  ours = np.asarray(jax_generate(params, prompts))
  theirs = torch_generate().numpy()
  same_tokens = float(np.mean(ours == theirs))
  first_diff = [int(np.argmax(o != t)) if (o != t).any() else new_tokens for o, t in zip(ours, theirs)]
  t_jax, _ = median_seconds(lambda: jax_generate(params, prompts).block_until_ready(), repeats)
  t_torch, _ = median_seconds(torch_generate, max(2, repeats // 2))
  n = batch * new_tokens
  return {"jax_s": t_jax, "torch_s": t_torch, "jax_tok_s": n / t_jax, "torch_tok_s": n / t_torch,
          "speedup": t_torch / t_jax, "same_tokens": same_tokens, "min_identical_prefix": min(first_diff),
          "config": config, "params": params}


def bench_multi_turn(config, params, repeats: int, batch=16, prompt_len=128, turns=8, obs_len=32, act_len=16):
  from stepjax.models import Transformer

  model = Transformer(config)
  rng = np.random.default_rng(1)
  prompt = rng.integers(3, config.vocab_size, (batch, prompt_len)).astype(np.int32)
  obs = rng.integers(3, config.vocab_size, (turns, batch, obs_len)).astype(np.int32)
  cfg = sampling.SamplingConfig(max_new_tokens=act_len, greedy=True)
  max_len = prompt_len + turns * (obs_len + act_len)
  full = lambda n: jnp.full((batch,), n, jnp.int32)

  @jax.jit
  def start(params, prompt):
    cache = init_cache(config, batch, max_len)
    cache, logits = sampling.prefill(model, params, prompt, full(prompt_len), cache)
    return sampling.decode(model, params, cache, logits, jax.random.key(0), cfg)

  @jax.jit
  def turn_with_extension(params, out, obs):
    cache, logits = sampling.extend(model, params, obs, full(obs_len), out.cache, out.next_logits)
    return sampling.decode(model, params, cache, logits, jax.random.key(0), cfg)

  @jax.jit
  def turn_with_reprefill(params, history):  # one compile per history length, as a rebuilt prompt would need
    cache = init_cache(config, batch, max_len)
    cache, logits = sampling.prefill(model, params, history, full(history.shape[1]), cache)
    return sampling.decode(model, params, cache, logits, jax.random.key(0), cfg)

  def run_extension():
    out = start(params, prompt)
    actions = [out.tokens]
    for k in range(turns - 1):
      out = turn_with_extension(params, out, obs[k])
      actions.append(out.tokens)
    return np.concatenate([np.asarray(a) for a in actions], axis=1)

  def run_reprefill():
    history = prompt
    out = start(params, prompt)
    actions = [out.tokens]
    for k in range(turns - 1):
      history = np.concatenate([history, np.asarray(out.tokens), obs[k]], axis=1)
      out = turn_with_reprefill(params, history)
      actions.append(out.tokens)
    return np.concatenate([np.asarray(a) for a in actions], axis=1)

  same = float(np.mean(run_extension() == run_reprefill()))
  t_ext, _ = median_seconds(run_extension, repeats)
  t_re, _ = median_seconds(run_reprefill, repeats)
  return {"extension_s": t_ext, "reprefill_s": t_re, "speedup": t_re / t_ext, "same_tokens": same}


def bench_packed_forward(config, repeats: int, batch=16, steps=8):
  model = PolicyWithValue(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  max_len = 1024
  ep = random_episode_batch(0, batch, max_len, steps, vocab_size=config.vocab_size, max_prompt=128, max_action=48,
                            max_obs=64, fill=True)
  ep = jax.tree_util.tree_map(jnp.asarray, ep)
  # Per-step rows (the StepRows layout): row (b, t) holds the context before step t plus step t's tokens, so
  # step t's log-probs and V(s_t) come from its own forward. Right-padded, so causal attention needs no pad mask.
  start, end = np.asarray(ep.step_start), np.asarray(ep.step_start + ep.step_len)
  width = int(end.max())
  rows = np.repeat(np.asarray(ep.tokens[:, :width]), steps, axis=0)
  step_tokens = jnp.asarray(np.where(np.arange(width)[None] < end.reshape(-1, 1), rows, 0))
  boundary = jnp.asarray(start.reshape(-1) - 1)

  @jax.jit
  def packed(params, tokens):
    logits, values, _, _ = model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0], ep.step_values(values)

  @jax.jit
  def per_step(params, tokens):
    logits, values, _, _ = model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    step_values = jnp.take_along_axis(values, boundary[:, None], 1)[:, 0].reshape(batch, steps)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0], step_values

  packed_logp, packed_values = packed(params, ep.tokens)
  step_logp, step_values = per_step(params, step_tokens)
  np.testing.assert_allclose(packed_values, step_values, atol=1e-4)
  last = np.arange(batch) * steps + steps - 1  # the last step's row holds every action token of the episode
  mask = np.asarray(ep.action_mask[:, 1:width])
  np.testing.assert_allclose(np.asarray(packed_logp[:, :width - 1])[mask], np.asarray(step_logp[last])[mask],
                             atol=1e-4)
  t_packed, _ = median_seconds(lambda: jax.block_until_ready(packed(params, ep.tokens)), repeats)
  t_step, _ = median_seconds(lambda: jax.block_until_ready(per_step(params, step_tokens)), repeats)
  return {"packed_s": t_packed, "per_step_s": t_step, "speedup": t_step / t_packed,
          "packed_tokens": int(np.prod(ep.tokens.shape)), "per_step_tokens": int(np.prod(step_tokens.shape)),
          "real_tokens": int(np.sum(ep.seq_len))}


def main(argv=None):
  parser = arg_parser(__doc__, repeats=5)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores", flush=True)
  gen = bench_generate(args.repeats)
  multi = bench_multi_turn(gen["config"], gen["params"], args.repeats)
  packed = bench_packed_forward(gen["config"], args.repeats)
  lines = [
      "| generation (B=16, prompt 128, 128 new, greedy) | median s | tokens/s | ratio |",
      "|---|---|---|---|",
      f"| transformers `generate` (PyTorch CPU, KV cache) | {gen['torch_s']:.3f} | {gen['torch_tok_s']:.0f} | 1.0x |",
      f"| stepjax `prefill` + `decode` (jit, while_loop) | {gen['jax_s']:.3f} | {gen['jax_tok_s']:.0f} | "
      f"**{gen['speedup']:.1f}x** |",
      "",
      f"Greedy outputs: {100 * gen['same_tokens']:.1f}% of generated tokens identical; every row identical for its "
      f"first {gen['min_identical_prefix']} tokens (f32 rounding can flip a near-tie argmax later).",
      "",
      "| multi-turn (B=16, 8 turns of 32 obs + 16 action tokens) | median s | ratio |",
      "|---|---|---|",
      f"| re-prefill the whole history every turn | {multi['reprefill_s']:.3f} | 1.0x |",
      f"| cache extension (`extend` + `decode`) | {multi['extension_s']:.3f} | **{multi['speedup']:.1f}x** |",
      "",
      f"Both variants produce the same actions: {100 * multi['same_tokens']:.1f}% identical tokens.",
      "",
      "| training forward (B=16 episodes x 8 steps, log-probs + step values) | median s | tokens processed | ratio |",
      "|---|---|---|---|",
      f"| one forward per step (`StepRows`) | {packed['per_step_s']:.3f} | {packed['per_step_tokens']} | 1.0x |",
      f"| one packed forward per episode (`EpisodeBatch`) | {packed['packed_s']:.3f} | {packed['packed_tokens']} | "
      f"**{packed['speedup']:.1f}x** |",
      "",
      f"({packed['real_tokens']} real tokens in the episodes; the rest of each layout is padding.)",
  ]
  emit(lines, args.markdown)
  return gen, multi, packed


if __name__ == "__main__":
  main()
