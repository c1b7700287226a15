"""The token-level environment API and the two pieces every pure-JAX text environment is built from.

An environment is a stateless object (gymnax style): shape-determining settings are fixed when it is constructed,
everything that varies per run lives in a `flax.struct` params dataclass, and `reset`/`step` are pure functions of
one episode that the rollout `vmap`s and `jit`s:

    state, obs, obs_len = env.reset(key, params)
    state, obs, obs_len, reward, terminated, truncated, info = env.step(key, state, action, action_len, params)

`obs` is a fixed-size [env.max_obs_len] int32 buffer holding `obs_len` token ids; `action` is [A] int32 holding
`action_len` ids exactly as the model generated them (end-of-step token included). `step` is the base class's
template method: an environment writes `step_env` (one transition of a running episode) and the base adds the step
budget and the no-op after the end of an episode, once for every environment (see `Environment`).

Token space, not text: observations are built from text fragments tokenised ONCE at construction with the run's
tokenizer (`Fragments`), and actions are parsed by matching their ids against the tokenised forms of every
command the environment understands (`CommandTable`). No detokenisation happens inside `jit`, and what the policy
reads is exactly what the environment wrote. A model that spells a command in a non-canonical tokenisation is
simply not understood, like any other unparseable action: it gets the environment's fixed feedback and penalty.
"""

from __future__ import annotations

import typing
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax.checks import fail
from stepjax.tokenizers import Tokenizer, pad_batch

Array = Any


class Fragments:
  """A table of text fragments tokenised once: `ids [F, K]`, `lengths [F]`, addressed by name or index.

  `compose(indices, max_len)` concatenates fragments (index -1 = nothing) into one [max_len] buffer inside jit.
  """

  def __init__(self, tokenizer: Tokenizer, texts: Sequence[str]):
    self.texts = list(texts)
    encoded = tokenizer.encode_batch(self.texts)
    self.max_fragment_len = max([len(e) for e in encoded] + [1])
    ids, mask = pad_batch(encoded, self.max_fragment_len, tokenizer.pad_id)
    self.ids = jnp.asarray(ids)
    self.lengths = jnp.asarray(mask.sum(axis=1), jnp.int32)
    self.host_lengths = mask.sum(axis=1)
    self.index = {text: i for i, text in enumerate(self.texts)}

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, text: str) -> int:
    return self.index[text]

  def longest(self, indices: Sequence[int]) -> int:
    """The index (among `indices`) of the fragment with the most tokens (for worst-case buffer sizing)."""
    return max(indices, key=lambda i: self.host_lengths[i])

  def max_len_of(self, indices: Sequence[int]) -> int:
    """Token length of a composition (host side; for sizing observation buffers)."""
    return int(sum(self.host_lengths[i] for i in indices if i >= 0))

  def compose(self, indices: Array, max_len: int) -> tuple[Array, Array]:
    """indices [n] int32 (-1 skips) -> (tokens [max_len] int32, length). Fragments past max_len are cut; size the
    buffer with `max_len_of` so that never happens."""
    indices = jnp.asarray(indices, jnp.int32)
    valid = indices >= 0
    lengths = jnp.where(valid, self.lengths[jnp.maximum(indices, 0)], 0)
    ends = jnp.cumsum(lengths)
    starts = ends - lengths
    pos = jnp.arange(max_len)
    which = jnp.clip(jnp.searchsorted(ends, pos, side="right"), 0, indices.shape[0] - 1)
    within = pos - starts[which]
    tokens = self.ids[jnp.maximum(indices[which], 0), jnp.clip(within, 0, self.max_fragment_len - 1)]
    total = ends[-1]
    return jnp.where(pos < total, tokens, 0).astype(jnp.int32), jnp.minimum(total, max_len).astype(jnp.int32)


class CommandTable:
  """Every command an environment understands, tokenised once: `match(action, len) -> command index or -1`.

  The action is compared after removing trailing stop tokens (end of step / end of episode). With `think=True`
  (the harness step format) an action must read `<think> ... </think>` followed by exactly one command, where
  `<think>` and `</think>` are single special tokens of the tokenizer.
  """

  def __init__(self, tokenizer: Tokenizer, commands: Sequence[str], *, think: bool = False):
    self.commands = list(commands)
    encoded = tokenizer.encode_batch(self.commands)
    self.max_command_len = max(len(e) for e in encoded)
    ids, mask = pad_batch(encoded, self.max_command_len, tokenizer.pad_id)
    self.ids = jnp.asarray(ids)
    self.lengths = jnp.asarray(mask.sum(axis=1), jnp.int32)
    self.stop_ids = jnp.asarray([tokenizer.end_of_step_id, tokenizer.eos_id], jnp.int32)
    self.think = think
    if think:
      specials = tokenizer.special_ids
      missing = [t for t in ("<think>", "</think>") if t not in specials]
      if missing:
        fail("step_format", f"'think' needs the special tokens {missing} in the tokenizer "
                            f"(e.g. ByteTokenizer(extra_special_tokens=('<think>', '</think>')))")
      self.think_open, self.think_close = specials["<think>"], specials["</think>"]

  def text(self, index: int) -> str:
    return self.commands[index]

  def match(self, action: Array, action_len: Array) -> Array:
    """action [A] int32, action_len [] -> index of the command it spells exactly, or -1."""
    a = action.shape[0]
    pos = jnp.arange(a)
    length = jnp.asarray(action_len, jnp.int32)
    ok = length <= a  # an action longer than this view spells no command
    length = jnp.minimum(length, a)
    # Drop trailing stop tokens: the end-of-step id ends the step, it is not part of the command. Counting from the
    # end of the buffer, padding slots count as "stop" so that the run starts at the last real token.
    is_stop = jnp.any(action[:, None] == self.stop_ids[None, :], axis=-1)
    trailing = jnp.cumprod(jnp.flip(jnp.where(pos < length, is_stop, True))).sum() - (a - length)
    length = length - trailing
    start = jnp.int32(0)
    if self.think:
      closes = (action == self.think_close) & (pos < length)
      close_at = jnp.argmax(closes)
      ok = ok & (action[0] == self.think_open) & jnp.any(closes)
      start = close_at + 1
    cmd = jnp.take(action, start + jnp.arange(self.max_command_len), mode="fill", fill_value=-1)
    k = jnp.arange(self.max_command_len)
    same = jnp.all((cmd[None, :] == self.ids) | (k[None, :] >= self.lengths[:, None]), axis=1)
    same = same & (self.lengths == length - start) & ok
    return jnp.where(jnp.any(same), jnp.argmax(same), -1).astype(jnp.int32)

  def encode(self, index: Array, action_len_max: int, end_of_step_id: int, think_ids: Sequence[int] = (),
             prefix: tuple[Array, Array] | None = None):
    """Command index -> (action [action_len_max] int32, length): the canonical tokens of that command followed by
    end-of-step (the scripted expert's actions). A think section goes in front (the harness format): fixed ids in
    `think_ids`, or `prefix` = (tokens [P] int32, length []) computed under jit (e.g. composed from `Fragments`)."""
    if prefix is None:
      ids = jnp.asarray(list(think_ids), jnp.int32)
      prefix = (ids, jnp.int32(ids.shape[0]))
    prefix_tokens, n_prefix = prefix
    cmd_len = self.lengths[index]
    pos = jnp.arange(action_len_max)
    from_cmd = jnp.take(self.ids[index], pos - n_prefix, mode="fill", fill_value=0)
    from_prefix = jnp.take(prefix_tokens, pos, mode="fill", fill_value=0) if prefix_tokens.shape[0] else 0
    tokens = jnp.where(pos < n_prefix, from_prefix, from_cmd)
    tokens = jnp.where(pos == n_prefix + cmd_len, end_of_step_id, tokens)
    length = n_prefix + cmd_len + 1
    return jnp.where(pos < length, tokens, 0).astype(jnp.int32), length.astype(jnp.int32)


class Environment:
  """Base class of pure-JAX token environments; `step` is a template method (gymnax's `step` / `step_env` split).

  A subclass sets `name`, `max_obs_len` and `max_action_len`, and implements `default_params`, `reset`, `step_env`,
  `expert_action` and `render`. The contract:

    params  a `flax.struct` dataclass with a `max_steps` field: the step budget (may be traced).
    state   a `flax.struct` dataclass with the fields `step_count` ([] int32, steps taken) and `done` ([] bool,
            terminated or truncated); `reset` sets them to 0 and False, and afterwards only `step` changes them
            (and the jitted rollout, which sets `done` on a row that ran out of context so that stepping it is
            the same no-op).
    step_env(key, state, action [A] int32, action_len [], params)
            -> (next_state, obs [max_obs_len] int32, obs_len [] int32, reward [] float, terminated [] bool,
                StepInfo): one transition of a running episode, computed unconditionally (branchless). It knows
            nothing of the budget or of finished episodes: whatever it leaves in next_state's `step_count` and
            `done` is overwritten. An observation that must say whether the episode goes on (a prompt cue) reads
            `is_last_step`.

  `step` (final: override `step_env`, never `step`) calls `step_env` and then, exactly once for every environment,
  counts the step, truncates the step that reaches `params.max_steps` unless it terminated, sets `done`, and makes
  stepping a finished episode a no-op (`unless_done`): the old state, an empty observation, zero reward, no flags.
  """

  name: str = "environment"
  max_obs_len: int
  max_action_len: int

  def default_params(self) -> Any:
    raise NotImplementedError

  def reset(self, key: Array, params: Any) -> tuple[Any, Array, Array]:
    raise NotImplementedError

  def step_env(self, key: Array, state: Any, action: Array, action_len: Array, params: Any):
    """-> (next_state, obs [max_obs_len] int32, obs_len, reward, terminated, StepInfo); see the class docstring."""
    raise NotImplementedError

  @typing.final
  def step(self, key: Array, state: Any, action: Array, action_len: Array, params: Any):
    """action [A] int32 (A any), action_len [] -> (state, obs [max_obs_len] int32, obs_len int32, reward float32,
    terminated bool, truncated bool, StepInfo). A finished episode stays as it is: empty obs, zero reward, no flags."""
    next_state, obs, obs_len, reward, terminated, info = self.step_env(key, state, action, action_len, params)
    terminated = jnp.asarray(terminated, bool)  # `~` of a Python bool is an int
    truncated = ~terminated & self.is_last_step(state, params)
    next_state = next_state.replace(step_count=state.step_count + 1, done=terminated | truncated)
    return unless_done(state, next_state, obs, obs_len, reward, terminated, truncated, info)

  def is_last_step(self, state: Any, params: Any) -> Array:
    """[] bool: the step taken from `state` uses up the budget (`step` truncates it unless it terminates)."""
    return state.step_count + 1 >= params.max_steps

  def expert_action(self, key: Array, state: Any, params: Any) -> tuple[Array, Array]:
    """The scripted expert's next action as (tokens [max_action_len], length), pure JAX."""
    raise NotImplementedError

  def render(self, state: Any) -> str:
    """A human-readable view of one (unbatched, concrete) state."""
    raise NotImplementedError


@struct.dataclass
class StepInfo:
  """What `step` reports besides the observation: `parsed` (the action was understood) and `success`."""

  parsed: Array
  success: Array


def unless_done(state, next_state, obs, obs_len, reward, terminated, truncated, info):
  """Stepping a finished episode is a no-op: the old state, an empty observation, zero reward, no flags.

  `Environment.step` passes every step through this once (environments compute their step unconditionally);
  `state` must have a boolean `done` field.
  """
  was_done = state.done
  next_state = jax.tree_util.tree_map(lambda old, new: jnp.where(was_done, old, new), state, next_state)
  return (next_state, jnp.where(was_done, 0, obs).astype(jnp.int32), jnp.where(was_done, 0, obs_len).astype(jnp.int32),
          jnp.where(was_done, 0.0, reward).astype(jnp.float32), terminated & ~was_done, truncated & ~was_done,
          StepInfo(parsed=info.parsed & ~was_done, success=info.success & ~was_done))


def host_array(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))
