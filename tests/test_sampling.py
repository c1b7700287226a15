"""The KV-cache sampler against full forward passes of the same model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import sampling
from stepjax.models import transformer

CONFIG = transformer.get_config("tiny", vocab_size=64, dtype="float32")
MODEL = transformer.Transformer(CONFIG)
PARAMS = transformer.init_params(CONFIG, jax.random.key(0))
B, T, N, M = 4, 10, 12, 48


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([10, 3, 7, 1], np.int32)
  tokens = np.zeros((B, T), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(3, CONFIG.vocab_size, n)
  return tokens, lengths


@functools.partial(jax.jit, static_argnames="config")
def _generate(tokens, lengths, key, config, budget=None):
  cache = transformer.init_cache(CONFIG, B, M)
  cache, logits = sampling.prefill(MODEL, PARAMS, tokens, lengths, cache)
  return sampling.decode(MODEL, PARAMS, cache, logits, key, config, budget=budget)


@jax.jit
def _full_logprobs(seq):
  logits, _, _ = MODEL.apply({"params": PARAMS}, seq)
  return jax.nn.log_softmax(logits, axis=-1)


def _concat(prompt, n, gen, m):
  return np.concatenate([prompt[:n], gen[:m]])


def _padded(seqs):
  out = np.zeros((len(seqs), M), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


def test_sampled_logprobs_equal_full_forward():
  tokens, lengths = _prompts()
  config = sampling.SamplingConfig(max_new_tokens=N, temperature=1.3, top_k=20, top_p=0.9)
  out = _generate(tokens, lengths, jax.random.key(1), config)
  gen, lp, n_gen = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)
  assert (n_gen == N).all()  # no stop ids, no budget: every row decodes the buffer
  seqs = [_concat(tokens[i], lengths[i], gen[i], n_gen[i]) for i in range(B)]
  full = np.asarray(_full_logprobs(_padded(seqs)))
  for i in range(B):
    for j in range(n_gen[i]):
      pos = lengths[i] + j
      np.testing.assert_allclose(lp[i, j], full[i, pos - 1, seqs[i][pos]], atol=1e-5)
  # The sampling log-probs (tempered, filtered distribution) are finite for every sampled token, and they are the
  # log-probs of that distribution (`filter_logits` of the same logits; a shift of the logits changes nothing), not
  # the policy's: at temperature 1.3 with top-k / top-p the two differ.
  slp = np.asarray(out.sample_logprobs)
  assert np.isfinite(slp).all()
  for i in range(B):
    positions = lengths[i] - 1 + np.arange(n_gen[i])
    sampled = np.asarray(jax.nn.log_softmax(sampling.filter_logits(jnp.asarray(full[i, positions]), config)))
    np.testing.assert_allclose(slp[i, :n_gen[i]], sampled[np.arange(n_gen[i]), gen[i, :n_gen[i]]], atol=1e-4)
  assert not np.allclose(slp, lp, atol=1e-3)
  # next_logits continue the sequence: they equal the full forward's last-position logits.
  for i in range(B):
    np.testing.assert_allclose(jax.nn.log_softmax(out.next_logits[i]), full[i, len(seqs[i]) - 1], atol=1e-5)


def test_greedy_equals_stepwise_argmax_of_full_forwards():
  tokens, lengths = _prompts(1)
  out = _generate(tokens, lengths, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=N, greedy=True))
  seqs = [list(tokens[i, :lengths[i]]) for i in range(B)]
  for _ in range(N):
    full = np.asarray(_full_logprobs(_padded(seqs)))
    for i in range(B):
      seqs[i].append(int(np.argmax(full[i, len(seqs[i]) - 1])))
  expect = np.array([s[lengths[i]:] for i, s in enumerate(seqs)])
  np.testing.assert_array_equal(np.asarray(out.tokens), expect)
  np.testing.assert_array_equal(np.asarray(out.sample_logprobs), 0.0)


def test_prefill_extend_continue_equals_one_prefill():
  tokens, lengths = _prompts(2)
  rng = np.random.default_rng(3)
  obs_lengths = np.array([0, 5, 2, 8], np.int32)
  obs = np.zeros((B, 8), np.int32)
  for i, n in enumerate(obs_lengths):
    obs[i, :n] = rng.integers(3, CONFIG.vocab_size, n)
  config = sampling.SamplingConfig(max_new_tokens=6, greedy=True)

  @jax.jit
  def multi_turn():
    cache = transformer.init_cache(CONFIG, B, M)
    cache, logits = sampling.prefill(MODEL, PARAMS, tokens, lengths, cache)
    first = sampling.decode(MODEL, PARAMS, cache, logits, jax.random.key(0), config)
    cache, logits = sampling.extend(MODEL, PARAMS, obs, obs_lengths, first.cache, first.next_logits)
    second = sampling.decode(MODEL, PARAMS, cache, logits, jax.random.key(0), config)
    return first, second

  first, second = multi_turn()
  # One prefill of the whole history (prompt + action + observation), then the same decode.
  history = [np.concatenate([tokens[i, :lengths[i]], np.asarray(first.tokens[i, :first.lengths[i]]),
                             obs[i, :obs_lengths[i]]]) for i in range(B)]
  hist_len = np.array([len(h) for h in history], np.int32)
  width = int(hist_len.max())
  hist = np.zeros((B, width), np.int32)
  for i, h in enumerate(history):
    hist[i, :len(h)] = h

  @jax.jit
  def one_prefill(hist, hist_len):
    cache = transformer.init_cache(CONFIG, B, M)
    cache, logits = sampling.prefill(MODEL, PARAMS, hist, hist_len, cache)
    return cache, logits, sampling.decode(MODEL, PARAMS, cache, logits, jax.random.key(0), config)

  cache, logits, again = one_prefill(hist, hist_len)
  np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(again.tokens))
  np.testing.assert_allclose(np.asarray(second.logprobs), np.asarray(again.logprobs), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(second.cache.lengths), np.asarray(again.cache.lengths))
  for i in range(B):  # the caches hold the same keys on every counted slot
    n = int(again.cache.lengths[i])
    np.testing.assert_allclose(np.asarray(second.cache.k[:, i, :n]), np.asarray(again.cache.k[:, i, :n]), atol=1e-5)


def test_chunked_extend_equals_single_call():
  tokens, lengths = _prompts(4)

  @functools.partial(jax.jit, static_argnames="chunk")
  def run(chunk):
    cache = transformer.init_cache(CONFIG, B, M)
    return sampling.prefill(MODEL, PARAMS, tokens, lengths, cache, chunk_size=chunk)

  (c1, l1), (c2, l2) = run(None), run(3)
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(c1.lengths), np.asarray(c2.lengths))
  for i in range(B):
    np.testing.assert_allclose(np.asarray(c1.k[:, i, :lengths[i]]), np.asarray(c2.k[:, i, :lengths[i]]), atol=1e-5)


def test_stop_tokens_and_budgets_per_row():
  tokens, lengths = _prompts(5)
  # Greedy from a fixed model: find which tokens it emits, then declare one of them a stop token.
  free = _generate(tokens, lengths, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=N, greedy=True))
  stop = int(free.tokens[0, 3])
  config = sampling.SamplingConfig(max_new_tokens=N, greedy=True, stop_ids=(stop,), pad_id=0)
  budget = jnp.array([N, 2, 5, N], jnp.int32)
  out = _generate(tokens, lengths, jax.random.key(0), config, budget)
  gen = np.asarray(free.tokens)
  for i in range(B):
    hits = np.flatnonzero(gen[i] == stop)
    expect = min(int(budget[i]), hits[0] + 1 if hits.size else N)
    assert out.lengths[i] == expect, (i, out.lengths, expect)
    assert bool(out.stopped[i]) == (hits.size > 0 and hits[0] + 1 <= budget[i])
    np.testing.assert_array_equal(out.tokens[i, :expect], gen[i, :expect])
    assert (np.asarray(out.tokens[i, expect:]) == 0).all() and (np.asarray(out.logprobs[i, expect:]) == 0).all()
  np.testing.assert_array_equal(np.asarray(out.cache.lengths), lengths + np.asarray(out.lengths))


def test_out_of_cache_row_stops_and_is_flagged():
  tokens, lengths = _prompts(6)

  @jax.jit
  def run():
    cache = transformer.init_cache(CONFIG, B, 14)  # row 0 (10 tokens) has room for 4 more
    cache, logits = sampling.prefill(MODEL, PARAMS, tokens, lengths, cache)
    return sampling.decode(MODEL, PARAMS, cache, logits, jax.random.key(0),
                           sampling.SamplingConfig(max_new_tokens=N, greedy=True))

  out = run()
  np.testing.assert_array_equal(np.asarray(out.lengths), np.minimum(N, 14 - lengths))
  np.testing.assert_array_equal(np.asarray(out.out_of_cache), 14 - lengths < N)
  assert int(out.cache.lengths.max()) == 14


def test_sampling_is_deterministic_given_key_and_varies_across_keys():
  tokens, lengths = _prompts(7)
  config = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0)
  a = _generate(tokens, lengths, jax.random.key(3), config)
  b = _generate(tokens, lengths, jax.random.key(3), config)
  c = _generate(tokens, lengths, jax.random.key(4), config)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_inactive_rows_generate_nothing():
  tokens, lengths = _prompts(8)

  @jax.jit
  def run():
    cache = transformer.init_cache(CONFIG, B, M)
    cache, logits = sampling.prefill(MODEL, PARAMS, tokens, lengths, cache)
    return sampling.decode(MODEL, PARAMS, cache, logits, jax.random.key(0),
                           sampling.SamplingConfig(max_new_tokens=4, greedy=True),
                           active=jnp.array([True, False, True, False]))

  out = run()
  np.testing.assert_array_equal(np.asarray(out.lengths), [4, 0, 4, 0])
  np.testing.assert_array_equal(np.asarray(out.cache.lengths), lengths + np.array([4, 0, 4, 0]))


def test_filter_logits_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 30)).astype(np.float32) * 3
  config = sampling.SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
  got = np.asarray(sampling.filter_logits(jnp.asarray(logits), config))
  for row, g in zip(logits, got):
    x = row / 0.7
    kth = np.sort(x)[::-1][9]
    x = np.where(x < kth, -np.inf, x)
    order = np.argsort(-x)
    p = np.exp(x[order] - x[order][0])
    p /= p.sum()
    keep = np.zeros_like(x, bool)
    mass = 0.0
    for idx, pi in zip(order, p):
      if mass >= 0.8:
        break
      keep[idx] = True
      mass += pi
    np.testing.assert_array_equal(g > -1e29, keep)
    np.testing.assert_allclose(g[keep], x[keep], rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                          ({"top_k": 999}, "top_k"), ({"top_k": -1}, "top_k"),
                                          ({"stop_ids": (64,)}, "stop_ids"), ({"pad_id": -1}, "pad_id")])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"sampling.{field}"):
    sampling.SamplingConfig(**kwargs).validate(vocab_size=64)
