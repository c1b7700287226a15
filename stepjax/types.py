"""The data contract: `EpisodeBatch` (packed, one row per episode) and `StepRows` (one row per step).

Layout of an `EpisodeBatch` row (right-padded, append-only context)::

    position  0 ............................................................ L-1
    tokens    [ prompt | act_0 | obs_0 | act_1 | obs_1 | ... | act_n | obs_n | pad ]
    action    [ 0 .. 0 | 1 .. 1| 0 .. 0| 1 .. 1| 0 .. 0| ... | 1 .. 1| 0 .. 0| 0.. ]
    step_ids  [-1 ..-1 | 0 .. 0|-1 ..-1| 1 .. 1|-1 ..-1| ... | n .. n|-1 ..-1|-1..]

The critic reads V(s_t) once per step at position ``step_start[t] - 1`` (the last context token before the
step's first action token); a truncated episode bootstraps from the value at ``bootstrap_pos`` (the last
token of the context after its last step). One causal forward pass over a row therefore yields every
step's log-probs and values.

`StepRows` is the layout of the reference PyTorch implementation: one row per step, prompt = the full context
before the step (left-padded), response = the step's tokens (right-padded), plus the observation the
environment answered with (right-padded), which makes the conversion lossless for append-only contexts and
carries what a truncated episode needs to bootstrap.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax.checks import check_array, is_concrete, require

Array = Any


def _check_fields(x, table) -> None:
  """table: rows of (space-separated field names, dtype kind for `check_array`, shape), checked in order."""
  for names, kind, shape in table:
    for name in names.split():
      check_array(getattr(x, name), name, kind, shape=shape)


def _take_rows(x: Array, idx: Array, fill=0) -> Array:
  """x [B, L], idx [B, K] -> x[b, idx[b, k]], `fill` where idx is out of range."""
  length = x.shape[1]
  valid = (idx >= 0) & (idx < length)
  out = jnp.take_along_axis(x, jnp.clip(idx, 0, length - 1), axis=1)
  return jnp.where(valid, out, jnp.asarray(fill, x.dtype))


@struct.dataclass
class EpisodeBatch:
  """One packed row per episode. B episodes, L tokens, S step slots.

  Per token:
    tokens        [B, L] int32  prompt, then each step's action tokens followed by the observation tokens.
    action_mask   [B, L] bool   True where the model generated the token.
    step_ids      [B, L] int32  step index of each action token, -1 elsewhere.
    logprobs      [B, L] float32  log-prob of each action token under the untempered, unfiltered model that acted
                                  (log_softmax of its raw logits; logprobs[p] scores tokens[p], predicted by the
                                  logits at p - 1), 0 elsewhere. Temperature / top-k / top-p shape only the sampling
                                  distribution; the learner computes this same untempered quantity, so the first
                                  PPO ratio is 1 at any temperature (up to the rounding of decode vs. training
                                  forward). The sampling distribution's own log-probs are
                                  `sampling.DecodeOutput.sample_logprobs`, not stored.
  Per step:
    step_start    [B, S] int32  position of the step's first action token (0 on invalid steps).
    step_len      [B, S] int32  number of action tokens in the step (0 on invalid steps).
    step_rewards  [B, S] float32  reward of the step (summed over the step), 0 on invalid steps.
    step_mask     [B, S] bool   True on valid steps; valid steps are a prefix 0..n-1.
  Per episode:
    seq_len       [B] int32  number of real tokens in the row; positions >= seq_len are padding.
    terminated    [B] bool   the task really ended (no bootstrap).
    truncated     [B] bool   step budget or context overflow ended it (bootstrap from `bootstrap_pos`).
    group_id      [B] int32  which task instance (groups for GRPO / RLOO / GiGPO).
    bootstrap_pos [B] int32  position whose value bootstraps a truncated episode: seq_len - 1.
  """

  tokens: Array
  action_mask: Array
  step_ids: Array
  logprobs: Array
  step_start: Array
  step_len: Array
  step_rewards: Array
  step_mask: Array
  seq_len: Array
  terminated: Array
  truncated: Array
  group_id: Array
  bootstrap_pos: Array

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def max_len(self) -> int:
    return self.tokens.shape[1]

  @property
  def max_steps(self) -> int:
    return self.step_start.shape[1]

  # -- reading a critic out of one packed forward ---------------------------------------------------
  def step_values(self, position_values: Array) -> Array:
    """[B, L] value head output at every position -> V(s_t) [B, S], read at step_start - 1; 0 on invalid steps."""
    v = _take_rows(position_values, self.step_start - 1)
    return jnp.where(self.step_mask, v, 0.0)

  def token_values(self, position_values: Array) -> Array:
    """[B, L] -> the value of the state before each action token (read at position p - 1), 0 off action tokens."""
    shifted = jnp.pad(position_values, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(self.action_mask, shifted, 0.0)

  def bootstrap_values(self, position_values: Array) -> Array:
    """[B, L] -> [B] value at `bootstrap_pos` (used only for truncated episodes)."""
    return _take_rows(position_values, self.bootstrap_pos[:, None])[:, 0]

  def token_rewards(self) -> Array:
    """Step rewards placed on each step's last action token: [B, L] (for token-level estimators)."""
    last = self.step_start + self.step_len - 1
    b = jnp.arange(self.batch_size)[:, None]
    pos = jnp.where(self.step_mask & (self.step_len > 0), last, self.max_len)  # out of range -> dropped
    out = jnp.zeros(self.tokens.shape, jnp.float32)
    return out.at[b, pos].add(self.step_rewards.astype(jnp.float32), mode="drop")

  def episode_returns(self) -> Array:
    """[B] undiscounted sum of step rewards."""
    return jnp.sum(jnp.where(self.step_mask, self.step_rewards, 0.0), axis=1)

  def num_steps(self) -> Array:
    return jnp.sum(self.step_mask, axis=1).astype(jnp.int32)

  # -- validation ----------------------------------------------------------------------------------
  def validate(self) -> "EpisodeBatch":
    """Checks shapes and dtypes (always) and the consistency of values (when the arrays are concrete).

    Raises ValueError with one line naming the field and what is allowed. Returns self so it chains.
    """
    check_array(self.tokens, "tokens", rank=2, dims="[B, L]")
    check_array(self.step_start, "step_start", rank=2, dims="[B, S]")
    b, l = self.tokens.shape
    s = self.step_start.shape[1]
    _check_fields(self, [("tokens", "int", (b, l)), ("action_mask", "bool", (b, l)), ("step_ids", "signed", (b, l)),
                         ("logprobs", "float", (b, l)), ("step_start step_len", "signed", (b, s)),
                         ("step_rewards", "float", (b, s)), ("step_mask", "bool", (b, s)),
                         ("seq_len group_id bootstrap_pos", "signed", (b,)), ("terminated truncated", "bool", (b,))])
    chex.assert_equal_shape([self.tokens, self.action_mask, self.step_ids, self.logprobs])
    if is_concrete(self):
      self._validate_values()
    return self

  def _validate_values(self) -> None:
    x = jax.tree_util.tree_map(np.asarray, self)
    b, l = x.tokens.shape
    s = x.step_start.shape[1]
    require(bool(np.all((x.seq_len >= 0) & (x.seq_len <= l))), "seq_len", f"must lie in [0, {l}]")
    m = x.step_mask
    require(bool(np.all(m[:, 1:] <= m[:, :-1])), "step_mask", "valid steps must be a prefix of the step slots")
    require(bool(np.all(x.step_len[m] >= 1)), "step_len", "every valid step needs at least one action token")
    require(bool(np.all((x.step_len[~m] == 0) & (x.step_start[~m] == 0))), "step_start",
            "invalid step slots must have step_start = step_len = 0")
    require(bool(np.all(x.step_start[m] >= 1)), "step_start",
            "a valid step starts at position >= 1 (the critic reads position step_start - 1)")
    end = x.step_start + x.step_len
    require(bool(np.all(end <= x.seq_len[:, None])), "step_len", "a step runs past seq_len")
    later = m[:, 1:]
    require(bool(np.all(np.where(later, x.step_start[:, 1:] >= end[:, :-1], True))), "step_start",
            "steps must be in increasing, non-overlapping order")
    # step_ids must be exactly the expansion of (step_start, step_len) (vectorised: one entry per action token).
    expect = np.full((b, l), -1, np.int64)
    counts = np.where(m, x.step_len, 0).reshape(-1)
    rows = np.repeat(np.repeat(np.arange(b), s), counts)
    steps = np.repeat(np.tile(np.arange(s), b), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    expect[rows, np.repeat(x.step_start.reshape(-1), counts) + offsets] = steps
    require(bool(np.array_equal(expect, x.step_ids)), "step_ids", "must equal the step index on each step's "
            "tokens [step_start, step_start + step_len) and -1 elsewhere")
    require(bool(np.array_equal(x.action_mask, expect >= 0)), "action_mask",
            "must be True exactly where step_ids >= 0")
    require(bool(np.all(x.logprobs[~x.action_mask] == 0)), "logprobs", "must be 0 off action tokens")
    require(bool(np.all(x.step_rewards[~m] == 0)), "step_rewards", "must be 0 on invalid steps")
    require(not bool(np.any(x.terminated & x.truncated)), "truncated",
            "an episode cannot be both terminated and truncated")
    has_steps = m.any(axis=1)
    require(bool(np.all(np.where(x.truncated & has_steps, x.bootstrap_pos >= end.max(axis=1) - 1, True))),
            "bootstrap_pos", "must not precede the last action token of a truncated episode")
    require(bool(np.all((x.bootstrap_pos >= 0) & (x.bootstrap_pos < np.maximum(x.seq_len, 1)))), "bootstrap_pos",
            "must lie in [0, seq_len)")


@struct.dataclass
class StepRows:
  """One row per step: N = B * S rows (row b * S + t is step t of episode b).

    prompt           [N, P] int32  the whole context before the step, LEFT-padded.
    prompt_mask      [N, P] bool
    response         [N, R] int32  the step's action tokens, right-padded.
    response_mask    [N, R] bool
    response_logprobs[N, R] float32  the untempered log-probs of `EpisodeBatch.logprobs`, 0 on padding.
    observation      [N, O] int32  the environment's answer appended after the step, right-padded.
    observation_mask [N, O] bool
    reward           [N] float32
    row_mask         [N] bool      True where the row is a real step.
    traj_id          [N] int32     which episode the step belongs to (0..B-1).
    step_index       [N] int32     t.
    group_id         [N] int32     the episode's group.
    terminated       [N] bool      the episode's flags, repeated on each of its rows.
    truncated        [N] bool
  """

  prompt: Array
  prompt_mask: Array
  response: Array
  response_mask: Array
  response_logprobs: Array
  observation: Array
  observation_mask: Array
  reward: Array
  row_mask: Array
  traj_id: Array
  step_index: Array
  group_id: Array
  terminated: Array
  truncated: Array

  def validate(self) -> "StepRows":
    check_array(self.prompt, "prompt", rank=2, dims="[N, P]")
    check_array(self.response, "response", rank=2, dims="[N, R]")
    check_array(self.observation, "observation", rank=2, dims="[N, O]")
    n, p = self.prompt.shape
    r = self.response.shape[1]
    o = self.observation.shape[1]
    _check_fields(self, [("prompt", "int", (n, p)), ("prompt_mask", "bool", (n, p)), ("response", "int", (n, r)),
                         ("response_mask", "bool", (n, r)), ("response_logprobs", "float", (n, r)),
                         ("observation", "int", (n, o)), ("observation_mask", "bool", (n, o)),
                         ("reward", "float", (n,)), ("row_mask terminated truncated", "bool", (n,)),
                         ("traj_id step_index group_id", "signed", (n,))])
    if is_concrete(self):
      x = jax.tree_util.tree_map(np.asarray, self)
      require(bool(np.all(x.prompt_mask[:, 1:] >= x.prompt_mask[:, :-1])), "prompt_mask", "prompts must be left-padded")
      require(bool(np.all(x.response_mask[:, 1:] <= x.response_mask[:, :-1])), "response_mask",
              "responses must be right-padded")
      require(bool(np.all(x.observation_mask[:, 1:] <= x.observation_mask[:, :-1])), "observation_mask",
              "observations must be right-padded")
      require(bool(np.all(x.response_mask.sum(1)[x.row_mask] >= 1)), "response_mask", "a real step needs >= 1 token")
    return self


# ------------------------------------------------------------------------------------------------------
# Lossless conversion (append-only contexts).
# ------------------------------------------------------------------------------------------------------


def _next_step_start(batch: EpisodeBatch) -> Array:
  """[B, S]: where the observation after step t ends = next valid step's start, else seq_len."""
  nxt = jnp.concatenate([batch.step_start[:, 1:], jnp.zeros_like(batch.step_start[:, :1])], axis=1)
  nxt_valid = jnp.concatenate([batch.step_mask[:, 1:], jnp.zeros_like(batch.step_mask[:, :1])], axis=1)
  return jnp.where(nxt_valid, nxt, batch.seq_len[:, None])


def to_step_rows(batch: EpisodeBatch, *, prompt_len: int, response_len: int, observation_len: int) -> StepRows:
  """EpisodeBatch -> StepRows with static widths P, R, O (jit-compatible; fixed shapes).

  The conversion is lossless when every prompt fits in P, every step in R and every observation in O
  (`step_rows_fit` checks that on concrete arrays). Rows of invalid steps have row_mask False and zero content.
  """
  b, s = batch.step_start.shape
  valid = batch.step_mask
  start = batch.step_start
  end = start + batch.step_len
  obs_end = _next_step_start(batch)

  def gather(x, first, count, width, left_pad):
    """For each (b, t): x[b, first : first + count] laid into `width` slots (left- or right-padded)."""
    k = jnp.arange(width)
    if left_pad:
      idx = first[..., None] + count[..., None] - width + k  # last slot holds the last token
      ok = k >= width - count[..., None]
    else:
      idx = first[..., None] + k
      ok = k < count[..., None]
    ok = ok & valid[..., None]
    rows = jnp.repeat(x, s, axis=0)  # [B*S, L]
    out = _take_rows(rows, idx.reshape(b * s, width))
    ok = ok.reshape(b * s, width)
    return jnp.where(ok, out, jnp.zeros((), x.dtype)), ok

  zeros = jnp.zeros_like(start)
  prompt, prompt_mask = gather(batch.tokens, zeros, start, prompt_len, True)
  response, response_mask = gather(batch.tokens, start, batch.step_len, response_len, False)
  logprobs, _ = gather(batch.logprobs, start, batch.step_len, response_len, False)
  observation, observation_mask = gather(batch.tokens, end, jnp.maximum(obs_end - end, 0), observation_len, False)
  per_episode = lambda x: jnp.repeat(x, s, axis=0)
  return StepRows(
      prompt=prompt, prompt_mask=prompt_mask, response=response, response_mask=response_mask,
      response_logprobs=logprobs, observation=observation, observation_mask=observation_mask,
      reward=jnp.where(valid, batch.step_rewards, 0).reshape(-1).astype(batch.step_rewards.dtype),
      row_mask=valid.reshape(-1),
      traj_id=per_episode(jnp.arange(b, dtype=jnp.int32)),
      step_index=jnp.tile(jnp.arange(s, dtype=jnp.int32), b),
      group_id=per_episode(batch.group_id), terminated=per_episode(batch.terminated),
      truncated=per_episode(batch.truncated))


def step_rows_fit(batch: EpisodeBatch, *, prompt_len: int, response_len: int, observation_len: int) -> bool:
  """Whether `to_step_rows` with these widths keeps everything (host-side check on concrete arrays)."""
  x = jax.tree_util.tree_map(np.asarray, batch)
  m = x.step_mask
  obs = np.asarray(_next_step_start(batch)) - (x.step_start + x.step_len)
  return bool(np.all(x.step_start[m] <= prompt_len) and np.all(x.step_len[m] <= response_len)
              and np.all(obs[m] <= observation_len))


def from_step_rows(rows: StepRows, *, num_episodes: int, max_len: int, max_steps: int) -> EpisodeBatch:
  """StepRows -> EpisodeBatch [num_episodes, max_len] with `max_steps` step slots (jit-compatible).

  Assumes an append-only context: the prompt of step t+1 is the prompt of step t followed by step t's
  response and observation. Each row's prompt, response and observation are scattered at their absolute
  positions into the row of episode `traj_id`; overlapping writes are identical by that assumption.
  """
  n, p = rows.prompt.shape
  r = rows.response.shape[1]
  o = rows.observation.shape[1]
  b, l, s = num_episodes, max_len, max_steps
  valid = rows.row_mask
  plen = jnp.sum(rows.prompt_mask, axis=1).astype(jnp.int32)
  rlen = jnp.sum(rows.response_mask, axis=1).astype(jnp.int32)
  olen = jnp.sum(rows.observation_mask, axis=1).astype(jnp.int32)
  traj = jnp.where(valid, rows.traj_id, b)  # out of range -> dropped
  tid = traj[:, None]

  def scatter(dst, values, pos, ok):
    pos = jnp.where(ok & valid[:, None], pos, l)
    return dst.at[jnp.broadcast_to(tid, pos.shape), pos].set(values.astype(dst.dtype), mode="drop")

  ppos = plen[:, None] - p + jnp.arange(p)  # left-padded prompt: last slot -> position plen - 1
  rpos = plen[:, None] + jnp.arange(r)
  opos = (plen + rlen)[:, None] + jnp.arange(o)
  tokens = jnp.zeros((b, l), rows.prompt.dtype)
  tokens = scatter(tokens, rows.prompt, ppos, rows.prompt_mask)
  tokens = scatter(tokens, rows.response, rpos, rows.response_mask)
  tokens = scatter(tokens, rows.observation, opos, rows.observation_mask)
  logprobs = scatter(jnp.zeros((b, l), rows.response_logprobs.dtype), rows.response_logprobs, rpos, rows.response_mask)
  step_ids = scatter(jnp.full((b, l), -1, jnp.int32), jnp.broadcast_to(rows.step_index[:, None], (n, r)), rpos,
                     rows.response_mask)

  step = jnp.where(valid, rows.step_index, s)

  def per_step(values, dtype):
    return jnp.zeros((b, s), dtype).at[traj, step].set(values.astype(dtype), mode="drop")

  step_mask = per_step(valid, jnp.bool_)
  seq_len = jnp.zeros((b,), jnp.int32).at[traj].max(plen + rlen + olen, mode="drop")

  def per_episode(values, dtype):  # every row of an episode carries the same value: any write wins
    return jnp.zeros((b,), dtype).at[traj].set(values.astype(dtype), mode="drop")

  truncated = per_episode(rows.truncated, jnp.bool_)
  return EpisodeBatch(
      tokens=tokens, action_mask=step_ids >= 0, step_ids=step_ids, logprobs=logprobs,
      step_start=per_step(plen, jnp.int32), step_len=per_step(rlen, jnp.int32),
      step_rewards=per_step(rows.reward, rows.reward.dtype), step_mask=step_mask, seq_len=seq_len,
      terminated=per_episode(rows.terminated, jnp.bool_), truncated=truncated,
      group_id=per_episode(rows.group_id, jnp.int32), bootstrap_pos=jnp.maximum(seq_len - 1, 0))
