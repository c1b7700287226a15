"""KV-cache sampling: prefill, cache extension and a jitted `lax.while_loop` decode with per-row stops.

Cache layout (one rule everywhere): rows are ragged and packed from slot 0, with no left padding. Row b holds its
own tokens in slots 0 .. cache.lengths[b]-1, and slot == RoPE position == position in the packed `EpisodeBatch`
row. Ragged inputs are passed right-padded with their true lengths (`chunk_lengths`): token i of row b goes to slot
cache.lengths[b] + i, and the padded tail is written into the cache but not counted (no query attends past its own
slot), so the next write overwrites it. Prefill, appending an environment observation and decoding one token are
therefore the same model call, and a multi-turn episode never re-encodes its history.

Two log-probs per sampled token (`DecodeOutput`): `logprobs` under the untempered, unfiltered model (log_softmax
of the raw logits) — the policy the learner optimises, and what `EpisodeBatch.logprobs` stores — and
`sample_logprobs` under the distribution actually sampled from (temperature, then top-k, then top-p; 0 when
greedy). They coincide at temperature 1 without top-k / top-p. `score_and_extend` (teacher forcing) gives the
former.

    cache = transformer.init_cache(config, batch, max_len)
    cache, logits = prefill(model, params, prompts, prompt_lengths, cache)          # logits of the next token
    out = decode(model, params, cache, logits, key, SamplingConfig(...), budget=...)  # one step's action
    cache, logits = extend(model, params, obs_tokens, obs_lengths, out.cache, out.next_logits)  # + observation
    out = decode(model, params, cache, logits, ...)                                  # next step ...

`model` is any linen module with the Transformer's call signature
`(tokens, positions=None, cache=None, chunk_lengths=None) -> (logits, hidden, cache)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from stepjax.checks import check_int, check_number, fail

Array = Any
NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings.

  temperature: > 0; ignored when greedy. top_k: 0 disables. top_p: 1.0 disables.
  max_new_tokens: the static size of the decode buffer (per-row budgets may be smaller).
  stop_ids: a row stops after emitting any of these (the stop token is part of the action).
  pad_id: written after a row has stopped.
  """

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def validate(self, vocab_size: int | None = None) -> "SamplingConfig":
    """One line naming the field and what is allowed; `vocab_size` (if given) bounds top_k and the token ids."""
    check_int(self.max_new_tokens, "sampling.max_new_tokens", 1)
    if not self.greedy:
      check_number(self.temperature, "sampling.temperature", lambda v: v > 0, "> 0 (or set greedy=True)")
    check_number(self.top_p, "sampling.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    check_int(self.top_k, "sampling.top_k", 0)
    if vocab_size is not None and self.top_k > vocab_size:
      fail("sampling.top_k", f"must lie in [0, vocab_size={vocab_size}], got {self.top_k!r}")
    if vocab_size is not None:
      for name, ids in (("stop_ids", self.stop_ids), ("pad_id", (self.pad_id,))):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
          fail(f"sampling.{name}", f"ids must lie in [0, {vocab_size}), got {bad}")
    return self


@struct.dataclass
class DecodeOutput:
  """What one `decode` call produced. N = max_new_tokens.

    tokens          [B, N] int32  generated tokens, `pad_id` after each row's length.
    logprobs        [B, N] float32  log-prob of each token under the untempered, unfiltered model (the policy the
                                    learner optimises; what the rollout stores), 0 on padding.
    sample_logprobs [B, N] float32  log-prob under the distribution actually sampled from (temperature, top-k,
                                    top-p: `filter_logits`); 0 for greedy and on padding.
    lengths         [B] int32     tokens generated per row (including the stop token).
    stopped         [B] bool      the row emitted a stop token (else it ran out of budget or cache).
    out_of_cache    [B] bool      the row stopped because its cache is full (its context overflowed).
    cache           the cache with every generated token appended.
    next_logits     [B, V] float32  logits for the token after each row's last token.
  """

  tokens: Array
  logprobs: Array
  sample_logprobs: Array
  lengths: Array
  stopped: Array
  out_of_cache: Array
  cache: Any
  next_logits: Array


def filter_logits(logits: Array, config: SamplingConfig) -> Array:
  """[B, V] float32 logits -> the logits of the sampling distribution (temperature, then top-k, then top-p)."""
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if config.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < config.top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def sample_token(key: Array, logits: Array, config: SamplingConfig) -> tuple[Array, Array, Array]:
  """[B, V] logits -> (token [B] int32, its log-prob under the untempered, unfiltered logits [B], its log-prob under
  the sampling distribution `filter_logits` [B] (0 when greedy))."""
  logits = logits.astype(jnp.float32)
  policy_logp = jax.nn.log_softmax(logits, axis=-1)
  if config.greedy:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_logp = jnp.zeros(token.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, config)
    token = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    sample_logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, jnp.take_along_axis(policy_logp, token[:, None], axis=-1)[:, 0], sample_logp


def _last_logits(logits: Array, lengths: Array, previous: Array | None) -> Array:
  """logits [B, T, V] of a chunk -> [B, V] at each row's last real token; rows with no new token keep `previous`."""
  idx = jnp.clip(lengths - 1, 0, logits.shape[1] - 1)
  last = jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]
  if previous is None:
    return last
  return jnp.where((lengths > 0)[:, None], last, previous)


def extend(model, params, tokens: Array, lengths: Array, cache, previous_logits: Array | None = None,
           chunk_size: int | None = None):
  """Appends right-padded `tokens [B, T]` (`lengths [B]` real ones) to the cache; returns (cache, next_logits [B, V]).

  With `chunk_size`, long inputs are fed in chunks of that many tokens (a `lax.scan`), bounding the activation
  memory of a long prefill; the result is the same. Rows with length 0 keep `previous_logits`.
  """
  b, t = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  if chunk_size is None or chunk_size >= t:
    logits, _, cache = model.apply({"params": params}, tokens, cache=cache, chunk_lengths=lengths)
    return cache, _last_logits(logits, lengths, previous_logits)
  num_chunks = -(-t // chunk_size)
  tokens = jnp.pad(tokens, ((0, 0), (0, num_chunks * chunk_size - t)))
  chunks = tokens.reshape(b, num_chunks, chunk_size).transpose(1, 0, 2)
  if previous_logits is None:
    previous_logits = jnp.zeros((b, _vocab_size(model)), jnp.float32)

  def body(carry, xs):
    cache, last = carry
    i, chunk = xs
    n = jnp.clip(lengths - i * chunk_size, 0, chunk_size)
    logits, _, cache = model.apply({"params": params}, chunk, cache=cache, chunk_lengths=n)
    return (cache, _last_logits(logits, n, last)), None

  (cache, last), _ = jax.lax.scan(body, (cache, previous_logits), (jnp.arange(num_chunks), chunks))
  return cache, last


def score_and_extend(model, params, tokens: Array, lengths: Array, cache, next_logits: Array):
  """Teacher forcing: appends given action tokens [B, T] (`lengths [B]` real ones) to the cache and scores them.

  Returns (cache, next_logits [B, V], logprobs [B, T]) with logprobs[b, j] = log pi(tokens[b, j] | context) under
  the untempered policy (0 past lengths[b]). Used to replay a scripted expert or a host-provided action through
  the same cache as sampled ones.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  logits, _, cache = model.apply({"params": params}, tokens, cache=cache, chunk_lengths=lengths)
  predicting = jnp.concatenate([next_logits[:, None].astype(jnp.float32), logits[:, :-1]], axis=1)
  logp = jnp.take_along_axis(jax.nn.log_softmax(predicting, axis=-1), tokens[..., None], axis=-1)[..., 0]
  logp = jnp.where(jnp.arange(tokens.shape[1])[None] < lengths[:, None], logp, 0.0)
  return cache, _last_logits(logits, lengths, next_logits), logp


def _vocab_size(model) -> int:
  return model.config.vocab_size


def prefill(model, params, tokens: Array, lengths: Array, cache, chunk_size: int | None = None):
  """The first `extend` of an (empty) cache: prompts [B, T] right-padded with `lengths [B]`."""
  return extend(model, params, tokens, lengths, cache, None, chunk_size)


def decode(model, params, cache, next_logits: Array, key: Array, config: SamplingConfig,
           budget: Array | None = None, active: Array | None = None) -> DecodeOutput:
  """Samples up to `config.max_new_tokens` tokens per row with a `lax.while_loop` over a preallocated cache.

  next_logits [B, V]: logits of each row's next token (from `prefill`/`extend`/a previous decode).
  budget [B] int32: per-row token budget for this step (<= max_new_tokens; default max_new_tokens).
  active [B] bool: rows that decode at all (inactive rows generate nothing and leave the cache untouched).
  A row stops after a stop token, at its budget, or when its cache is full (`out_of_cache`). Every generated
  token, the stop token included, is written into the cache, so the next `extend` continues the context.
  """
  b = next_logits.shape[0]
  n = config.max_new_tokens
  budget = jnp.full((b,), n, jnp.int32) if budget is None else jnp.minimum(jnp.asarray(budget, jnp.int32), n)
  active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
  capacity = cache.max_len - cache.lengths
  stop_ids = jnp.asarray(config.stop_ids if config.stop_ids else (-1,), jnp.int32)

  def finished(lengths, stopped):
    return stopped | (lengths >= budget) | (lengths >= capacity) | ~active

  def cond(state):
    i, _, _, lengths, stopped, *_ = state
    return (i < n) & ~jnp.all(finished(lengths, stopped))

  def body(state):
    i, cache, logits, lengths, stopped, tokens, logps, sample_logps, key = state
    live = ~finished(lengths, stopped)
    key, sub = jax.random.split(key)
    token, logp, sample_logp = sample_token(sub, logits, config)
    token = jnp.where(live, token, config.pad_id)
    tokens = tokens.at[:, i].set(token)
    logps = logps.at[:, i].set(jnp.where(live, logp, 0.0))
    sample_logps = sample_logps.at[:, i].set(jnp.where(live, sample_logp, 0.0))
    step_logits, _, cache = model.apply({"params": params}, token[:, None], cache=cache,
                                        chunk_lengths=live.astype(jnp.int32))
    logits = jnp.where(live[:, None], step_logits[:, 0], logits)
    stopped = stopped | (live & jnp.any(token[:, None] == stop_ids[None, :], axis=-1))
    return i + 1, cache, logits, lengths + live, stopped, tokens, logps, sample_logps, key

  init = (jnp.int32(0), cache, next_logits.astype(jnp.float32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool),
          jnp.full((b, n), config.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32),
          key)
  _, cache, logits, lengths, stopped, tokens, logps, sample_logps, _ = jax.lax.while_loop(cond, body, init)
  out_of_cache = ~stopped & (lengths >= capacity) & (lengths < budget) & active
  return DecodeOutput(tokens=tokens, logprobs=logps, sample_logprobs=sample_logps, lengths=lengths, stopped=stopped,
                      out_of_cache=out_of_cache, cache=cache, next_logits=logits)


def generate(model, params, prompts: Array, prompt_lengths: Array, key: Array, config: SamplingConfig,
             max_len: int | None = None, init_cache_fn=None) -> DecodeOutput:
  """One-shot prefill + decode (the `generate` of other libraries). Returns the DecodeOutput."""
  from stepjax.models import transformer  # local: sampling sits beside the models layer

  b, t = prompts.shape
  max_len = max_len or t + config.max_new_tokens
  cache = (init_cache_fn or transformer.init_cache)(model.config, b, max_len)
  cache, logits = prefill(model, params, prompts, prompt_lengths, cache)
  return decode(model, params, cache, logits, key, config)


def stop_ids_for(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """End-of-step and end-of-episode ids of a tokenizer (plus `extra`), for `SamplingConfig.stop_ids`."""
  return tuple(dict.fromkeys((tokenizer.end_of_step_id, tokenizer.eos_id, *extra)))
