"""The episode loop: it turns a policy and environments into an `EpisodeBatch`.

One agent step is three pure pieces, shared by both loops:

  `act`     decode one action per row with the KV-cache sampler (or replay the scripted expert's tokens through the
            same cache), write its tokens, log-probs and step boundary into the batch under construction;
  env step  the vmapped pure-JAX environment (inside jit) or a pool of host environments (Python threads);
  `observe` append the observation to the batch and to the cache (cache extension, never a re-prefill) and record
            the reward and terminated / truncated flags.

`make_rollout(model, env, config)` builds the whole episode loop for a pure-JAX environment as one pure function (one
`lax.scan` over steps; jit it once); `rollout(...)` is the cached, jitted convenience around it.
`make_host_rollout(model, config, tokenizer)` builds a loop that drives host environments step by step with the
same jitted pieces.

Log-probs: `EpisodeBatch.logprobs` holds, for every action token, its log-prob under the untempered, unfiltered
model (`sampling.DecodeOutput.logprobs`): the behaviour policy the learner's ratios compare against. The log-prob
under the distribution actually sampled from (temperature, top-k, top-p; `DecodeOutput.sample_logprobs`) is not
stored; with temperature 1 and no filtering the two are the same.

Context budget: a step starts only if the row still has room for a whole step (max_action_len tokens) and the
largest observation (max_obs_len); otherwise the episode ends as truncated (context overflow) before the step, so
no token is ever dropped. Reaching the rollout's `max_steps` (or the environment's own step budget) also truncates.
Only the environment's own end of task terminates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax import sampling
from stepjax import sharding as sharding_lib
from stepjax.checks import check_choice, check_int, fail
from stepjax.models.transformer import KVCache, cache_logical_axes, init_cache
from stepjax.types import EpisodeBatch

Array = Any
ACTORS = ("model", "expert")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static rollout settings.

  num_tasks x episodes_per_task episodes per batch; the episodes of one task share its reset key and `group_id`
  (the groups of GRPO / RLOO / GiGPO). max_len: context length of every row (prompt + all steps + observations).
  max_action_len: per-step token budget. max_obs_len: observation buffer (host loops; JAX envs use their own).
  stop_ids: tokens that end a step (end-of-step, end-of-episode). pad_id fills unused slots.
  """

  num_tasks: int = 8
  episodes_per_task: int = 1
  max_steps: int = 8
  max_len: int = 512
  max_action_len: int = 24
  max_obs_len: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_ids: tuple[int, ...] = (1, 2)
  pad_id: int = 0

  @property
  def batch_size(self) -> int:
    return self.num_tasks * self.episodes_per_task

  def sampling_config(self) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(max_new_tokens=self.max_action_len, temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, greedy=self.greedy, stop_ids=self.stop_ids, pad_id=self.pad_id)

  def validate(self, max_obs_len: int | None = None, vocab_size: int | None = None) -> "RolloutConfig":
    """One line naming the field and what is allowed; `max_obs_len` is the environment's observation buffer."""
    for name in ("num_tasks", "episodes_per_task", "max_steps", "max_len", "max_action_len", "max_obs_len"):
      check_int(getattr(self, name), f"rollout.{name}", 1)
    obs = self.max_obs_len if max_obs_len is None else max_obs_len
    need = obs + self.max_action_len + obs
    if self.max_len < need:
      fail("rollout.max_len", f"{self.max_len} cannot hold the first observation plus one step "
                              f"(max_action_len={self.max_action_len} + max_obs_len={obs}); use max_len >= {need}")
    self.sampling_config().validate(vocab_size)
    return self


@struct.dataclass
class RolloutState:
  """The batch under construction plus what decoding needs. `batch.seq_len` is each row's current length."""

  batch: EpisodeBatch
  cache: Any
  next_logits: Array  # [B, V]
  done: Array  # [B] bool
  step: Array  # [] int32


def _write(buffer: Array, start: Array, values: Array, lengths: Array) -> Array:
  """buffer [B, L]: row b gets values[b, :lengths[b]] at positions start[b] ... (nothing else changes)."""
  b, width = values.shape
  pos = start[:, None] + jnp.arange(width)[None]
  pos = jnp.where(jnp.arange(width)[None] < lengths[:, None], pos, buffer.shape[1])  # out of range -> dropped
  return buffer.at[jnp.arange(b)[:, None], pos].set(values.astype(buffer.dtype), mode="drop")


def begin(model, params, obs: Array, obs_len: Array, group_id: Array, config: RolloutConfig) -> RolloutState:
  """Starts every row with its first observation [B, O] (prefilled into a fresh [B, max_len] cache)."""
  b, s, l = obs.shape[0], config.max_steps, config.max_len
  obs_len = jnp.asarray(obs_len, jnp.int32)
  zeros_bl = jnp.zeros((b, l), jnp.int32)
  batch = EpisodeBatch(
      tokens=_write(zeros_bl, jnp.zeros((b,), jnp.int32), obs, obs_len), action_mask=jnp.zeros((b, l), bool),
      step_ids=jnp.full((b, l), -1, jnp.int32), logprobs=jnp.zeros((b, l), jnp.float32),
      step_start=jnp.zeros((b, s), jnp.int32), step_len=jnp.zeros((b, s), jnp.int32),
      step_rewards=jnp.zeros((b, s), jnp.float32), step_mask=jnp.zeros((b, s), bool), seq_len=obs_len,
      terminated=jnp.zeros((b,), bool), truncated=jnp.zeros((b,), bool), group_id=jnp.asarray(group_id, jnp.int32),
      bootstrap_pos=jnp.zeros((b,), jnp.int32))
  cache = init_cache(model.config, b, l)
  cache, next_logits = sampling.prefill(model, params, obs, obs_len, cache)
  return RolloutState(batch=batch, cache=cache, next_logits=next_logits, done=jnp.zeros((b,), bool),
                      step=jnp.int32(0))


def act(model, params, rs: RolloutState, key: Array, config: RolloutConfig, max_obs_len: int,
        forced_actions: tuple[Array, Array] | None = None):
  """Decodes (or, with `forced_actions` = (tokens [B, A], lengths [B]), replays) one action per live row.

  Returns (state, action tokens [B, A], action lengths [B], active [B]). Rows without room for a whole step and
  the largest observation end here as truncated (context overflow) instead of stepping. The batch gets the tokens'
  log-probs under the untempered, unfiltered policy (`DecodeOutput.logprobs`, never `sample_logprobs`).
  """
  batch, t = rs.batch, rs.step
  fits = batch.seq_len + config.max_action_len + max_obs_len <= config.max_len
  overflow = ~rs.done & ~fits
  active = ~rs.done & fits
  if forced_actions is None:
    out = sampling.decode(model, params, rs.cache, rs.next_logits, key, config.sampling_config(), active=active)
    tokens, lengths, logprobs, cache, next_logits = out.tokens, out.lengths, out.logprobs, out.cache, out.next_logits
  else:
    tokens, lengths = forced_actions
    lengths = jnp.where(active, jnp.asarray(lengths, jnp.int32), 0)
    tokens = jnp.where(jnp.arange(tokens.shape[1])[None] < lengths[:, None], tokens, config.pad_id)
    cache, next_logits, logprobs = sampling.score_and_extend(model, params, tokens, lengths, rs.cache,
                                                            rs.next_logits)
  start = batch.seq_len
  batch = batch.replace(
      tokens=_write(batch.tokens, start, tokens, lengths),
      logprobs=_write(batch.logprobs, start, logprobs, lengths),
      action_mask=_write(batch.action_mask, start, jnp.ones_like(tokens, bool), lengths),
      step_ids=_write(batch.step_ids, start, jnp.full_like(tokens, t), lengths),
      step_start=batch.step_start.at[:, t].set(jnp.where(active, start, 0)),
      step_len=batch.step_len.at[:, t].set(lengths),
      step_mask=batch.step_mask.at[:, t].set(active),
      seq_len=start + lengths,
      truncated=batch.truncated | overflow)
  return rs.replace(batch=batch, cache=cache, next_logits=next_logits, done=rs.done | overflow), tokens, lengths, active


def observe(model, params, rs: RolloutState, obs: Array, obs_len: Array, reward: Array, terminated: Array,
            truncated: Array) -> RolloutState:
  """Appends each row's observation [B, O] (obs_len [B] tokens) to the batch and the cache; records reward [B] and
  the end flags [B] (terminated wins over truncated).

  A row that did not step this time (finished earlier, or out of context) must come with obs_len 0, reward 0 and no
  flags. Both loops guarantee it without masking here: the jitted loop marks such rows `done` for the environment,
  whose `Environment.step` then returns exactly that, and the host loop steps no environment for them.
  """
  batch, t = rs.batch, rs.step
  obs_len = jnp.asarray(obs_len, jnp.int32)
  terminated = jnp.asarray(terminated, bool)
  truncated = jnp.asarray(truncated, bool) & ~terminated
  cache, next_logits = sampling.extend(model, params, obs, obs_len, rs.cache, rs.next_logits)
  batch = batch.replace(
      tokens=_write(batch.tokens, batch.seq_len, obs, obs_len),
      step_rewards=batch.step_rewards.at[:, t].set(jnp.asarray(reward, jnp.float32)),
      seq_len=batch.seq_len + obs_len,
      terminated=batch.terminated | terminated,
      truncated=batch.truncated | truncated)
  return rs.replace(batch=batch, cache=cache, next_logits=next_logits, done=rs.done | terminated | truncated,
                    step=t + 1)


def finish(rs: RolloutState) -> EpisodeBatch:
  """Rows still running after max_steps are truncated (step budget); bootstrap from the last context token."""
  batch = rs.batch
  return batch.replace(truncated=batch.truncated | ~rs.done, bootstrap_pos=jnp.maximum(batch.seq_len - 1, 0))


@struct.dataclass
class RolloutInfo:
  """Per-episode extras, each [B]: success (the environment reported success on some step), parsed_steps (steps
  whose action the environment understood) and invalid_steps (the other steps taken: `from_counts` derives them
  from the batch's step_mask and parsed_steps)."""

  success: Array
  parsed_steps: Array
  invalid_steps: Array

  @classmethod
  def from_counts(cls, batch: EpisodeBatch, success: Array, parsed_steps: Array, **extra) -> "RolloutInfo":
    """invalid_steps = the steps taken (`batch.step_mask`) that did not parse."""
    steps_taken = jnp.sum(batch.step_mask, axis=1, dtype=jnp.int32)
    return cls(success=success, parsed_steps=parsed_steps, invalid_steps=steps_taken - parsed_steps, **extra)


def task_keys_and_groups(key: Array, config: RolloutConfig, group_offset: Array | int = 0, task_keys: Array = None):
  """Reset keys [B] (episodes of one task share a key) and group ids [B]. task_keys: [num_tasks] keys to use
  instead of fresh ones split from `key` (a fixed pool of training tasks)."""
  tasks = jax.random.split(key, config.num_tasks) if task_keys is None else task_keys
  keys = jnp.repeat(tasks, config.episodes_per_task, axis=0)
  groups = jnp.repeat(jnp.arange(config.num_tasks, dtype=jnp.int32), config.episodes_per_task)
  return keys, groups + jnp.asarray(group_offset, jnp.int32)


def make_rollout(model, env, config: RolloutConfig, actor: str = "model") -> Callable:
  """-> `rollout(params, env_params, key, group_offset=0, task_keys=None) -> (EpisodeBatch, RolloutInfo)`, one pure
  function (jit it once). task_keys: [num_tasks] reset keys (e.g. drawn from a fixed task pool); default: fresh keys
  split from `key`.

  actor="model" samples actions from the policy; actor="expert" replays the environment's scripted expert through
  the same cache (its tokens scored by the policy), which is what SFT warm starts and replay tests use.
  """
  check_choice(actor, "rollout.actor", ACTORS)
  config.validate(env.max_obs_len, model.config.vocab_size)
  if env.max_action_len > config.max_action_len and actor == "expert":
    fail("rollout.max_action_len", f"{config.max_action_len} is shorter than the expert's actions "
                                   f"({env.max_action_len} tokens)")
  obs_width = env.max_obs_len
  reset = jax.vmap(env.reset, in_axes=(0, None))
  env_step = jax.vmap(env.step, in_axes=(0, 0, 0, 0, None))
  expert = jax.vmap(env.expert_action, in_axes=(0, 0, None))

  def rollout(params, env_params, key, group_offset=0, task_keys=None):
    b = config.batch_size
    reset_key, key = jax.random.split(key)
    keys, groups = task_keys_and_groups(reset_key, config, group_offset, task_keys)
    env_state, obs, obs_len = reset(keys, env_params)
    rs = begin(model, params, obs, obs_len, groups, config)

    def one_step(carry, step_key):
      rs, env_state, success, parsed_steps = carry
      act_key, env_key, expert_key = jax.random.split(step_key, 3)
      forced = None
      if actor == "expert":
        tokens, lengths = expert(jax.random.split(expert_key, b), env_state, env_params)
        pad = config.max_action_len - tokens.shape[1]
        forced = (jnp.pad(tokens, ((0, 0), (0, pad))), lengths)
      rs, action, action_len, active = act(model, params, rs, act_key, config, obs_width, forced)
      # A row that does not step (finished, or out of context: then its environment does not know it has ended) is
      # marked done for its environment, whose `Environment.step` then keeps its state and returns an empty
      # observation, zero reward, no flags and no parsed/success: the one place the environment's side of a
      # finished row is masked (observe and the counts below rely on it).
      env_state = env_state.replace(done=env_state.done | ~active)
      env_state, obs, obs_len, reward, term, trunc, step_info = env_step(
          jax.random.split(env_key, b), env_state, action[:, :env_action_width(env, config)], action_len, env_params)
      rs = observe(model, params, rs, obs, obs_len, reward, term, trunc)
      return (rs, env_state, success | step_info.success, parsed_steps + step_info.parsed), None

    carry = (rs, env_state, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (rs, _, success, parsed_steps), _ = jax.lax.scan(one_step, carry, jax.random.split(key, config.max_steps))
    batch = finish(rs)
    return batch, RolloutInfo.from_counts(batch, success, parsed_steps)

  return rollout


def env_action_width(env, config: RolloutConfig) -> int:
  """Environments read at most `env.max_action_len` tokens (with the true length): a longer action cannot spell any
  of their commands, so cutting the view changes no outcome and keeps the environment's shapes its own."""
  return min(config.max_action_len, env.max_action_len)


def rollout(policy_params, env, env_params, key, config: RolloutConfig, model, actor: str = "model"):
  """Convenience: build, jit and run the episode loop -> (EpisodeBatch, RolloutInfo). The jitted program is cached
  per (model, env, config, actor), so calling this again with new params, env params or key does not retrace."""
  return _jitted_rollout(model, env, config, actor)(policy_params, env_params, key)


@functools.lru_cache(maxsize=16)
def _jitted_rollout(model, env, config: RolloutConfig, actor: str) -> Callable:
  """One jitted `make_rollout` per key: a flax module and the frozen config hash by value, an environment by
  identity (its static settings live on the object), so equal arguments share one compiled program."""
  return jax.jit(make_rollout(model, env, config, actor))


def make_host_rollout(model, config: RolloutConfig, tokenizer, actor: str = "model", *, mesh=None,
                      rules=None) -> Callable:
  """-> `host_rollout(params, pool, seeds, key, group_ids=None, timings=None) -> (EpisodeBatch, HostRolloutInfo)`
  for host environments.

  `pool` is a `stepjax.envs.host.HostEnvPool` (one env per row; len(pool) == config.batch_size). Each step calls the
  same jitted `act` / `observe` as the jitted loop; in between, the actions are decoded to text for the environments
  (the model's tokens stay in the batch exactly as generated) and the observations are encoded once (text) or used as
  given (token ids). An observation longer than `config.max_obs_len` cannot be appended without dropping tokens:
  that episode ends there as truncated, without the observation, and `HostRolloutInfo.obs_overflow` flags it.

  actor="model" samples the actions; actor="expert" replays each env's `expert_command()` instead (the SFT warm start
  of host environments): its text encoded with `tokenizer` plus the end-of-step token, forced through the same cache
  as the jitted loop's expert (`act` with forced actions: the tokens are action tokens, scored by the policy). An
  env without an expert command for a live row (None: e.g. a TextWorld game with no winning policy left) gets the
  end-of-step token alone, an empty command. An expert action longer than `max_action_len` is a one-line ValueError
  naming rollout.max_action_len (it could not be replayed without cutting it).

  With `mesh` and `rules` (both or neither; `params` then lives in the train state's shardings): the jitted pieces run
  under the logical-axis rules, so the model's constraints split the rows (batch, KV cache, activations) over
  data x fsdp, and every host array fed to them (observations, rewards, flags, expert actions) is placed over data x
  fsdp first (`sharding.batch_shardings`); the envs are stepped here, one env per row.

  With several processes (`jax.distributed`) each steps only its share of the rows, `sharding.process_rows` of the
  batch (the rows its devices hold): `pool`, `seeds` and `group_ids` are that share's, its host arrays enter the
  programs through `sharding.host_local_to_global`, and it reads back only its rows of each action
  (`sharding.process_local`). The EpisodeBatch and the HostRolloutInfo are global arrays (the same as one process
  stepping every env), and every process runs the same number of steps: the loop ends when no row of any process is
  live.
  """
  check_choice(actor, "rollout.actor", ACTORS)
  if (mesh is None) != (rules is None):
    fail("rules" if rules is None else "mesh", "pass mesh and rules together")
  config.validate(config.max_obs_len, model.config.vocab_size)
  width = config.max_obs_len
  per_row = dataclasses.replace(config, num_tasks=1, episodes_per_task=1)
  begin_fn, force_fn, observe_fn, finish_fn = _host_pieces(model, dataclasses.replace(
      per_row, temperature=1.0, top_k=0, top_p=1.0, greedy=False), mesh, rules)
  act_fn = _host_act(model, per_row, mesh, rules)
  end_of_step = tokenizer.end_of_step_id
  several = mesh is not None and jax.process_count() > 1
  first_row, stop_row = sharding_lib.process_rows(config.batch_size, mesh) if several else (0, config.batch_size)

  def place(*arrays):
    """Host arrays [B, ...] (this process's rows) as the jitted pieces take them: as they are on one device, over
    data x fsdp on a mesh (from every process's rows with several)."""
    if mesh is None:
      return arrays
    if several:
      return sharding_lib.host_local_to_global(arrays, mesh)
    return jax.device_put(arrays, sharding_lib.batch_shardings(arrays, mesh))

  local = sharding_lib.process_local if several else np.asarray  # this process's rows of a program's output

  def expert_actions(pool, live):
    """[B, max_action_len] tokens and [B] lengths of each env's expert command (rows not live: empty)."""
    tokens = np.full((len(pool), config.max_action_len), config.pad_id, np.int32)
    lengths = np.zeros((len(pool),), np.int32)
    for i, env in enumerate(pool.envs):
      if not live[i]:
        continue
      command = env.expert_command()
      ids = (tokenizer.encode(command) if command is not None else []) + [end_of_step]
      if len(ids) > config.max_action_len:
        fail("rollout.max_action_len", f"{config.max_action_len} is shorter than the expert's action {command!r:.80} "
                                       f"({len(ids)} tokens with the end-of-step token)")
      tokens[i, :len(ids)] = ids
      lengths[i] = len(ids)
    return tokens, lengths

  def encode(observations, rows_ok):
    ids = np.zeros((len(observations), width), np.int32)
    lengths = np.zeros((len(observations),), np.int32)
    overflow = np.zeros((len(observations),), bool)
    for i, obs in enumerate(observations):
      if obs is None or not rows_ok[i]:
        continue
      tokens = np.asarray(tokenizer.encode(obs) if isinstance(obs, str) else obs, np.int32).reshape(-1)
      if tokens.shape[0] > width:
        overflow[i] = True
        continue
      ids[i, :tokens.shape[0]] = tokens
      lengths[i] = tokens.shape[0]
    return ids, lengths, overflow

  def host_rollout(params, pool, seeds: Sequence[int], key, group_ids=None, timings: dict | None = None):
    """`timings`, if given, accumulates seconds per phase ("act", "env", "observe"), synchronising the device."""
    b = stop_row - first_row
    clock = _PhaseClock(timings)
    if len(pool) != b or len(seeds) != b:
      share = "" if b == config.batch_size else f"; this process's share: rows {first_row}-{stop_row - 1}"
      raise ValueError(f"host_rollout: need one env and one seed per row (batch_size={config.batch_size}{share}), got "
                       f"{len(pool)} envs and {len(seeds)} seeds")
    first, lengths, overflow = encode(pool.reset(list(seeds)), np.ones(b, bool))
    if overflow.any():
      raise ValueError(f"rollout.max_obs_len: the first observation of env {int(np.argmax(overflow))} is longer than "
                       f"{width} tokens; raise max_obs_len")
    groups = (np.arange(first_row, stop_row, dtype=np.int32) if group_ids is None
              else np.asarray(group_ids, np.int32))
    rs = begin_fn(params, *place(first, lengths, groups))
    success, parsed, obs_overflow = np.zeros(b, bool), np.zeros(b, np.int32), np.zeros(b, bool)
    env_metrics: dict[str, np.ndarray] = {}
    for step_key in jax.random.split(key, config.max_steps):
      with clock("act"):
        if actor == "expert":
          rs, action, action_len, active = force_fn(params, rs, step_key,
                                                    *place(*expert_actions(pool, ~local(rs.done))))
        else:
          rs, action, action_len, active = act_fn(params, rs, step_key)
        live = bool(jnp.any(active)) if several else None  # every process's rows: all take the same steps
        active, action, action_len = local(active), local(action), local(action_len)
      if not (active.any() if live is None else live):
        break
      with clock("env"):
        requests = [(tokenizer.decode(action[i, :action_len[i]], skip_special=True), action[i, :action_len[i]])
                    if active[i] else None for i in range(b)]
        results = pool.step(requests)
      obs, obs_len, overflow = encode([r.observation if r is not None else None for r in results], active)
      reward = np.array([r.reward if r is not None else 0.0 for r in results], np.float32)
      term = np.array([bool(r.terminated) if r is not None else False for r in results])
      trunc = np.array([bool(r.truncated) if r is not None else False for r in results]) | (overflow & ~term)
      for i, r in enumerate(results):
        if r is not None:
          success[i] |= bool(r.info.get("success", False))
          parsed[i] += bool(r.info.get("parsed", True))
          for name in HOST_INFO_METRICS:
            if isinstance(r.info.get(name), (int, float, np.number)):
              env_metrics.setdefault(name, np.zeros(b, np.float32))[i] = float(r.info[name])
      obs_overflow |= overflow
      with clock("observe"):
        rs = jax.block_until_ready(observe_fn(params, rs, *place(obs, obs_len, reward, term, trunc)))
    batch = finish_fn(rs)
    if several:  # the per-row counts as global arrays too, over the names any process's envs reported
      from jax.experimental import multihost_utils  # noqa: PLC0415

      reported = np.asarray([name in env_metrics for name in HOST_INFO_METRICS])
      reported = np.asarray(multihost_utils.process_allgather(reported)).reshape(-1, len(reported)).any(axis=0)
      env_metrics = {name: env_metrics.get(name, np.zeros(b, np.float32))
                     for name, seen in zip(HOST_INFO_METRICS, reported) if seen}
      success, parsed, obs_overflow, env_metrics = place(success, parsed, obs_overflow, env_metrics)
    return batch, HostRolloutInfo.from_counts(batch, success, parsed, obs_overflow=obs_overflow,
                                              env_metrics=env_metrics)

  return host_rollout


def _host_jit(fn: Callable, mesh, rules) -> Callable:
  """`jax.jit`, or on a mesh `sharding.jit_with_rules` with every output's rows over data x fsdp (the KV cache by its
  logical axes, scalars replicated): the rollout state then comes back in one layout whichever piece made it, so each
  piece compiles once per batch size instead of once per layout its inputs arrive in, and the model's logical
  constraints keep every row's work on its devices."""
  if mesh is None:
    return jax.jit(fn)
  cache = sharding_lib.shardings_from_logical(cache_logical_axes(), mesh, rules)

  def constrain(x):
    if isinstance(x, KVCache):
      return jax.lax.with_sharding_constraint(x, cache)
    return jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(mesh, x.ndim) if x.ndim
                                            else sharding_lib.replicated(mesh))

  def laid_out(*args):
    return jax.tree.map(constrain, fn(*args), is_leaf=lambda x: isinstance(x, KVCache))

  return sharding_lib.jit_with_rules(laid_out, mesh, rules)


@functools.lru_cache(maxsize=16)
def _host_pieces(model, config: RolloutConfig, mesh=None, rules=None) -> tuple[Callable, ...]:
  """The jitted begin / forced act / observe / finish of the host loop, shared by every host rollout of one model
  and one per-row config (`config` with the batch layout and the sampling settings normalised away: the batch size
  enters through the arrays' shapes, and none of these samples), so a run's training, evaluation and expert loops
  compile them once per batch size (and mesh)."""
  width = config.max_obs_len
  begin_fn = _host_jit(lambda params, obs, obs_len, groups: begin(model, params, obs, obs_len, groups, config),
                       mesh, rules)
  force_fn = _host_jit(lambda params, rs, key, tokens, lengths: act(model, params, rs, key, config, width,
                                                                   (tokens, lengths)), mesh, rules)
  observe_fn = _host_jit(lambda params, rs, obs, obs_len, reward, term, trunc: observe(
      model, params, rs, obs, obs_len, reward, term, trunc), mesh, rules)
  return begin_fn, force_fn, observe_fn, _host_jit(finish, mesh, rules)


@functools.lru_cache(maxsize=16)
def _host_act(model, config: RolloutConfig, mesh=None, rules=None) -> Callable:
  """The jitted sampling `act` of the host loop, shared like `_host_pieces` (per sampling settings)."""
  return _host_jit(lambda params, rs, key: act(model, params, rs, key, config, config.max_obs_len), mesh, rules)


class _PhaseClock:
  """Accumulates wall seconds per named phase into a dict (or does nothing without one)."""

  def __init__(self, timings: dict | None):
    self.timings = timings

  def __call__(self, phase: str):
    if self.timings is None:
      return contextlib.nullcontext()

    @contextlib.contextmanager
    def timed():
      start = time.perf_counter()
      yield
      self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    return timed()


# Per-episode numbers a host env may report in `HostStep.info` (search_qa: exact match, token F1, searches so far;
# any env: env_error, set by `envs.host.error_step` when an episode ended on the env's exception or a timeout); the
# host loop keeps each episode's last reported value in `HostRolloutInfo.env_metrics`.
HOST_INFO_METRICS = ("em", "f1", "searches", "env_error")


@struct.dataclass
class HostRolloutInfo(RolloutInfo):
  """RolloutInfo plus obs_overflow [B]: an observation did not fit `max_obs_len`, so the episode was truncated; and
  env_metrics: {name: [B] float32} for each of `HOST_INFO_METRICS` the envs report (the last value of each episode,
  0 for an episode that never reported it; empty when no env reports any)."""

  obs_overflow: Array = None
  env_metrics: dict = None
