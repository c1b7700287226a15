"""Fuzz drill: random action sequences through every pure-JAX environment's jitted, vmapped `step`, with the
invariants checked on the reset and on every step.

    python -m drills.fuzz --sequences 10000 [--envs lookup_qa,grid_nav/think] [--batch 1000] [--seed 0]

Covered (`drill_envs`): lookup_qa plain and think, byte and word tokenizers, the smallest pool; grid_nav plain, think
and max_size 10; textworld_lite plain, think, and the admissible list at the smallest and largest sizes. Params vary
per sequence (hops 0..max_hops + 1, grid sizes 1..max_size + 2, keys, hole and door probabilities, rooms and
distractors, step budgets, invalid penalties), out-of-range values included: the envs clip them.

Each step's action is drawn from a per-sequence random mix of `KINDS`: the expert's action; a command of the env's
table in its step format; a well-formed command with random arguments or a near miss (a word swapped, cut, doubled,
cased, the other step format; `action_pool`); random ids from the model's vocabulary (the tokenizer's, rounded up
to 64); a command with stop ids (end of step, end of episode, pad) put at random places; an empty action; a
max-length one. Budgets stay below the sequence length, so every sequence also steps its finished episode.

`fuzz_env` checks `GENERIC_CHECKS` and the env's own `ENV_CHECKS` (`SPECS`) and returns a `FuzzReport`. The
drill's envs have OBS_SLACK spare observation tokens, so an observation longer than the env's computed worst case
is seen (obs_len is checked against that bound) instead of being cut silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stepjax.envs import grid_nav, lookup_qa, textworld_lite
from stepjax.envs.base import CommandTable
from stepjax.tokenizers import ByteTokenizer, WordTokenizer

Array = Any

STATS = ("parsed", "success", "terminated", "truncated", "after_done")
KINDS = ("expert", "command", "mutated", "tokens", "stops", "empty", "max_len")
EXPERT, COMMAND, MUTATED, TOKENS, STOPS, EMPTY, MAX_LEN = range(len(KINDS))
THINK_TOKENS = ("<think>", "</think>")
OBS_SLACK = 32  # spare observation buffer of the drill's environments
POOL_SIZE = 1024  # host-made commands with random arguments, per environment
NUM_DRAWS = 8  # random words per step besides the action's tokens

GENERIC_CHECKS = {
    "shapes": "obs [max_obs_len] int32, obs_len [] int32, reward [] float32, flags [] bool",
    "finite": "every float in the state and the reward is finite",
    "reward_range": "reward within the env's documented range",
    "done_monotone": "done never goes back from True to False",
    "done_flags": "done = was done | terminated | truncated; never both flags; no flags after the end",
    "noop_after_done": "a step of a finished episode: same state, empty obs, reward 0, nothing parsed",
    "step_count": "step_count + 1 per step of a running episode, unchanged after the end",
    "step_budget": "step_count <= max_steps; reaching it ends the episode; truncated only there",
    "obs_vocab": "every observation id in [0, vocab_size)",
    "obs_len": "0 <= obs_len <= the env's computed worst case (and the buffer)",
    "obs_padding": "ids past obs_len are 0, ids before it are not pad",
    "obs_nonempty": "the reset and every step of a running episode say something",
    "success_terminates": "info.success only on a terminating step",
    "parsing": "the expert's and the table's canonical commands parse, an empty action does not",
    "reset_state": "reset: step_count 0, done False",
}
ENV_CHECKS = {
    "lookup_qa.hops": "hops clipped to [1, max_hops]",
    "lookup_qa.world": "entities in the pool, the chain distinct and written into the facts, no self facts",
    "lookup_qa.answered": "answered is -1 or an entity; success means the chain's answer",
    "lookup_qa.world_fixed": "facts, chain, path and hops never change",
    "lookup_qa.searched_grows": "searched entities stay searched",
    "lookup_qa.reward_table": "reward = 1 on success + invalid_penalty when unparsed, else 0",
    "lookup_qa.answer_ends": "the episode ends exactly at its parsed answer",
    "lookup_qa.obs_len_by_kind": "invalid feedback has its fixed length; facts and answers fit their own bounds",
    "grid_nav.size": "size clipped to [3, max_size]",
    "grid_nav.cells": "agent, goal and key on the grid; holes only on it, never under the goal or the key",
    "grid_nav.position": "the agent is on a hole iff it fell; success means it is on the goal",
    "grid_nav.world_fixed": "holes, goal, key and size never change",
    "grid_nav.one_cell": "a move goes at most one cell, an unparsed action none",
    "grid_nav.key": "the key stays taken; the goal is reached only with the key when one is needed",
    "grid_nav.reward_table": "reward = 1 on success + invalid_penalty when unparsed, else 0",
    "grid_nav.ends": "terminated iff the agent reached the goal or fell",
    "grid_nav.obs_len_by_kind": "invalid feedback has its fixed length; moves and endings fit their own bounds",
    "textworld_lite.player_room": "the player is in an active room",
    "textworld_lite.objects": "object locations are valid codes or floors of active rooms; the goal object exists",
    "textworld_lite.layout": "containers in active rooms, a valid goal target, doors a tree over the active rooms",
    "textworld_lite.layout_fixed": "rooms, doors, containers and the goal never change",
    "textworld_lite.opens_stay_open": "open doors and containers stay open",
    "textworld_lite.objects_stay": "absent objects stay absent, present ones present",
    "textworld_lite.walks_through_open_doors": "the player moves only through an open door of its room",
    "textworld_lite.reward_table": "reward 1 on success, else 0 or invalid_penalty; invalid_penalty when unparsed",
    "textworld_lite.success_is_goal": "success (and termination) exactly when the goal holds after the step",
    "textworld_lite.unparsed_changes_nothing": "an unparsed action leaves the world as it was",
}


@dataclasses.dataclass(frozen=True, eq=False)
class EnvSpec:
  """What the drill knows about one environment (by `env.name`): its documented reward range, per-sequence params,
  and its own invariants. `state_checks(env, state)` hold in every state; `transition_checks(env, params, state,
  next_state, out)` on every step; both return {name: (ok [] bool, value [] number)}."""

  reward_range: Callable[[Any], tuple[Array, Array]]
  vary_params: Callable[[Any, Array, Any, int], Any]  # (env, bits [8] uint32, params, num_steps) -> params
  state_checks: Callable[..., dict] = lambda env, state: {}
  transition_checks: Callable[..., dict] = lambda env, params, state, next_state, out: {}
  extra_words: Callable[[Any], tuple[str, ...]] = lambda env: ()
  num_steps: int = 16


@dataclasses.dataclass
class FuzzReport:
  """Counts of one `fuzz_env` run; `failures[name]` = (checks failed, first failure's message)."""

  name: str
  sequences: int = 0
  steps: int = 0
  checks: tuple[str, ...] = ()
  failures: dict = dataclasses.field(default_factory=dict)
  stats: dict = dataclasses.field(default_factory=dict)
  longest_obs: int = 0  # the longest observation seen
  obs_bound: int = 0  # the env's computed worst case

  @property
  def violations(self) -> int:
    return sum(count for count, _ in self.failures.values())

  @property
  def messages(self) -> list[str]:
    return [f"{name}: {count} failed checks; first: {first}" for name, (count, first) in self.failures.items()]


# ----------------------------------------------------------------------------------------------------------------
# Per-environment knowledge.

def _uniform(bits: Array) -> Array:
  return (bits >> 8).astype(jnp.float32) * 2.0 ** -24


def _below(bits: Array, low: int, high: int) -> Array:
  """An int32 in [low, high) from random bits."""
  return low + ((bits >> 1).astype(jnp.int32) % (high - low))


def _penalty(bits: Array) -> Array:
  """0.0, -0.1 or uniform in [-1, 0): the documented uses of invalid_penalty."""
  u = _uniform(bits)
  return jnp.where(bits % 3 == 0, 0.0, jnp.where(bits % 3 == 1, -0.1, -u)).astype(jnp.float32)


def _budget(bits: Array, num_steps: int) -> Array:
  """max_steps below num_steps (so every sequence also steps its finished episode): a quarter of them anywhere in
  [1, num_steps - 1), the rest in the upper half (fewer wasted steps after the end)."""
  high = max(num_steps - 1, 2)
  anywhere, upper = _below(bits >> 2, 1, high), _below(bits >> 2, max(high // 2, 1), high)
  return jnp.where(bits % 4 == 0, anywhere, upper)


def _penalty_range(success: float):
  """reward in {0, success, invalid_penalty}: [min(0, penalty), max(success, penalty)]."""
  def reward_range(params):
    penalty = jnp.asarray(params.invalid_penalty, jnp.float32)
    return jnp.minimum(0.0, penalty), jnp.maximum(jnp.float32(success), penalty)
  return reward_range


def _same(a, b) -> Array:
  return jnp.all(jnp.asarray(a) == jnp.asarray(b))


def _running_only(state, checks: dict) -> dict:
  """Transition checks hold for steps of a running episode (after the end `noop_after_done` covers them)."""
  return {name: (ok | state.done, value) for name, (ok, value) in checks.items()}


def _lookup_qa_vary(env, bits, params, num_steps):
  return params.replace(hops=_below(bits[0], 0, env.max_hops + 2), max_steps=_budget(bits[1], num_steps),
                        invalid_penalty=_penalty(bits[2]))


def _lookup_qa_state(env, s):
  n, h = env.num_entities, env.max_hops
  chain_ok = jnp.all((s.chain >= 0) & (s.chain < n))
  distinct = jnp.sum(s.chain[:, None] == s.chain[None, :]) == h + 1
  facts_ok = jnp.all((s.facts >= 0) & (s.facts < n) & (s.facts != jnp.arange(n)[:, None]))
  linked = jnp.all(s.facts[s.chain[:h], s.path] == s.chain[1:])
  paths_ok = jnp.all((s.path >= 0) & (s.path < len(lookup_qa.RELATIONS)))
  answered_ok = (s.answered >= -1) & (s.answered < n) & (~s.success | (s.answered == s.chain[s.hops]))
  return {"lookup_qa.hops": ((s.hops >= 1) & (s.hops <= h), s.hops),
          "lookup_qa.world": (chain_ok & distinct & facts_ok & linked & paths_ok, 0),
          "lookup_qa.answered": (answered_ok, s.answered)}


def _lookup_qa_transition(env, params, s, t, out):
  reward, terminated, info, obs_len = out["reward"], out["terminated"], out["info"], out["obs_len"]
  expected = jnp.where(info.success, lookup_qa.SUCCESS_REWARD, 0.0) + jnp.where(info.parsed, 0.0,
                                                                                 params.invalid_penalty)
  bound = env.max_obs_lens
  kind_len = jnp.where(~info.parsed, obs_len == bound["invalid"],
                       jnp.where(terminated, obs_len <= bound["answer"], obs_len <= bound["facts"]))
  return _running_only(s, {
      "lookup_qa.world_fixed": (_same(s.facts, t.facts) & _same(s.chain, t.chain) & _same(s.path, t.path)
                                & _same(s.hops, t.hops), 0),
      "lookup_qa.searched_grows": (jnp.all(t.searched | ~s.searched), 0),
      "lookup_qa.reward_table": (reward == expected.astype(jnp.float32), reward),
      "lookup_qa.answer_ends": ((terminated == (info.parsed & (t.answered >= 0))) & (s.answered < 0), t.answered),
      "lookup_qa.obs_len_by_kind": (kind_len, obs_len),
  })


def _grid_nav_vary(env, bits, params, num_steps):
  return params.replace(size=_below(bits[0], 1, env.max_size + 3), hole_prob=_uniform(bits[1]),
                        use_key=bits[2] % 2 == 0, max_steps=_budget(bits[3], num_steps),
                        invalid_penalty=_penalty(bits[4]))


def _grid_nav_state(env, s):
  inside = lambda cell: jnp.all((cell >= 0) & (cell < s.size))
  ys, xs = jnp.meshgrid(jnp.arange(env.max_size), jnp.arange(env.max_size), indexing="ij")
  holes_inside = ~jnp.any(s.holes & ((xs >= s.size) | (ys >= s.size)))
  on_hole = s.holes[s.position[1], s.position[0]]
  return {"grid_nav.size": ((s.size >= 3) & (s.size <= env.max_size), s.size),
          "grid_nav.cells": (inside(s.position) & inside(s.goal) & inside(s.key_position) & holes_inside
                             & ~s.holes[s.goal[1], s.goal[0]] & ~s.holes[s.key_position[1], s.key_position[0]], 0),
          "grid_nav.position": ((on_hole == s.fell) & (~s.success | _same(s.position, s.goal)), on_hole)}


def _grid_nav_transition(env, params, s, t, out):
  reward, info, terminated = out["reward"], out["info"], out["terminated"]
  expected = jnp.where(info.success, grid_nav.SUCCESS_REWARD, 0.0) + jnp.where(info.parsed, 0.0,
                                                                                params.invalid_penalty)
  moved = jnp.sum(jnp.abs(t.position - s.position))
  bound, obs_len = env.max_obs_lens, out["obs_len"]
  kind_len = jnp.where(~info.parsed, obs_len == bound["invalid"],
                       jnp.where(terminated, obs_len <= bound["end"], obs_len <= bound["move"]))
  return _running_only(s, {
      "grid_nav.world_fixed": (_same(s.holes, t.holes) & _same(s.goal, t.goal) & _same(s.size, t.size)
                               & _same(s.key_position, t.key_position) & _same(s.needs_key, t.needs_key), 0),
      "grid_nav.one_cell": ((moved <= 1) & (info.parsed | (moved == 0)), moved),
      "grid_nav.key": ((t.has_key | ~s.has_key) & (~info.success | ~t.needs_key | t.has_key), 0),
      "grid_nav.reward_table": (reward == expected.astype(jnp.float32), reward),
      "grid_nav.ends": (terminated == (t.success | t.fell), 0),
      "grid_nav.obs_len_by_kind": (kind_len, obs_len),
  })


def _textworld_lite_vary(env, bits, params, num_steps):
  return params.replace(num_rooms_used=_below(bits[0], 0, env.num_rooms + 3),
                        num_distractors=_below(bits[1], -1, env.num_objects + 2),
                        door_closed_prob=_uniform(bits[2]), container_closed_prob=_uniform(bits[3]),
                        put_goal_prob=_uniform(bits[4]), max_steps=_budget(bits[5], num_steps),
                        invalid_penalty=_penalty(bits[6]))


def _textworld_lite_state(env, s):
  location = s.object_location
  valid = (location >= -1) & (location <= env.carried)
  on_floor_of_active = ~((location >= 0) & (location < env.num_rooms)) | s.room_active[jnp.clip(location, 0,
                                                                                                   env.num_rooms - 1)]
  goal_in_range = jnp.where(s.goal_is_put, s.goal_target < env.num_containers, s.room_active[
      jnp.clip(s.goal_target, 0, env.num_rooms - 1)] & (s.goal_target < env.num_rooms)) & (s.goal_target >= 0)
  return {"textworld_lite.player_room": (s.room_active[s.player_room], s.player_room),
          "textworld_lite.objects": (jnp.all(valid & on_floor_of_active) & (location[s.goal_object] >= 0), 0),
          "textworld_lite.layout": (jnp.all(s.room_active[s.container_room]) & goal_in_range
                                    & (jnp.sum(s.door_active) == jnp.sum(s.room_active) - 1), 0)}


def _textworld_lite_transition(env, params, s, t, out):
  reward, info, terminated = out["reward"], out["info"], out["terminated"]
  fixed = [(s.room_active, t.room_active), (s.door_rooms, t.door_rooms), (s.door_active, t.door_active),
           (s.container_room, t.container_room), (s.goal_is_put, t.goal_is_put), (s.goal_object, t.goal_object),
           (s.goal_target, t.goal_target)]
  a, b = s.door_rooms[:, 0], s.door_rooms[:, 1]
  joins = ((a == s.player_room) & (b == t.player_room)) | ((b == s.player_room) & (a == t.player_room))
  walked = (s.player_room == t.player_room) | jnp.any(joins & s.door_active & s.door_open)
  reward_ok = jnp.where(info.success, reward == textworld_lite.SUCCESS_REWARD,
                        (reward == 0.0) | (reward == jnp.asarray(params.invalid_penalty, jnp.float32)))
  reward_ok = reward_ok & (info.parsed | (reward == jnp.asarray(params.invalid_penalty, jnp.float32)))
  return _running_only(s, {
      "textworld_lite.layout_fixed": (functools.reduce(jnp.logical_and, [_same(x, y) for x, y in fixed]), 0),
      "textworld_lite.opens_stay_open": (jnp.all(t.door_open | ~s.door_open)
                                         & jnp.all(t.container_open | ~s.container_open), 0),
      "textworld_lite.objects_stay": (_same(s.object_location == -1, t.object_location == -1), 0),
      "textworld_lite.walks_through_open_doors": (walked, t.player_room),
      "textworld_lite.reward_table": (reward_ok, reward),
      "textworld_lite.success_is_goal": ((info.success == env.goal_achieved(t)) & (terminated == info.success), 0),
      "textworld_lite.unparsed_changes_nothing": (info.parsed | _tree_equal(s.replace(step_count=0, done=False),
                                                                            t.replace(step_count=0, done=False)), 0),
  })


def _textworld_lite_words(env):
  return (textworld_lite.ROOM_NAMES + textworld_lite.DOOR_COLOURS + textworld_lite.CONTAINER_NAMES
          + textworld_lite.OBJECT_NAMES + ("door", "in", "to", "the", "inventory", "north"))


SPECS = {
    "lookup_qa": EnvSpec(
        reward_range=_penalty_range(lookup_qa.SUCCESS_REWARD), vary_params=_lookup_qa_vary,
        state_checks=_lookup_qa_state, transition_checks=_lookup_qa_transition, num_steps=10,
        extra_words=lambda env: lookup_qa.ENTITY_NAMES + lookup_qa.RELATIONS + ("Correct", "mentor", "of")),
    "grid_nav": EnvSpec(
        reward_range=_penalty_range(grid_nav.SUCCESS_REWARD), vary_params=_grid_nav_vary,
        state_checks=_grid_nav_state, transition_checks=_grid_nav_transition, num_steps=20,
        extra_words=lambda env: ("up", "down", "left", "right", "North", "go", "key", "goal", "northeast")),
    "textworld_lite": EnvSpec(
        reward_range=_penalty_range(textworld_lite.SUCCESS_REWARD), vary_params=_textworld_lite_vary,
        state_checks=_textworld_lite_state, transition_checks=_textworld_lite_transition, num_steps=16,
        extra_words=_textworld_lite_words),
}


# ----------------------------------------------------------------------------------------------------------------
# Actions.

def command_table(env) -> CommandTable:
  """The env's `CommandTable` (`commands` in lookup_qa and grid_nav, `command_table` in textworld_lite)."""
  for attribute in ("command_table", "commands"):
    table = getattr(env, attribute, None)
    if isinstance(table, CommandTable):
      return table
  raise ValueError(f"{env.name}: no CommandTable found (looked at command_table and commands)")


def computed_obs_bound(env) -> int:
  """The env's own worst-case observation length (not its buffer size, which may be larger)."""
  if hasattr(env, "max_obs_lens"):
    return int(max(env.max_obs_lens.values()))
  if hasattr(env, "_worst_observation_len"):
    return int(env._worst_observation_len())
  return int(env.max_obs_len)


def action_pool(env, extra_words=(), size: int = POOL_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Host side: `size` well-formed commands with random arguments and near misses, in the env's step format (and
  the wrong one), encoded once -> (ids [size, max_action_len] int32, lengths [size] int32)."""
  table, tok = command_table(env), env.tokenizer
  rng = np.random.default_rng(seed)
  commands = table.commands
  split = [text.split(" ") for text in commands]
  verbs = sorted({words[0] for words in split})
  words = sorted({w for ws in split for w in ws} | set(extra_words))
  pick = lambda xs: xs[rng.integers(len(xs))]
  texts = []
  for _ in range(size):
    command = pick(commands)
    kind = rng.integers(8)
    if kind == 1:
      text = " ".join([pick(verbs)] + [pick(words) for _ in range(rng.integers(1, 4))])
    elif kind == 2:
      ws = command.split(" ")
      ws[rng.integers(len(ws))] = pick(words)
      text = " ".join(ws)
    elif kind == 3:
      text = command[:rng.integers(len(command) + 1)]
    elif kind == 4:
      text = command + pick([" ", "\n", ". ", " then "]) + pick(commands)
    elif kind == 5:
      text = pick([command.replace(" ", "  "), " " + command, command + " ", command.capitalize(), command.upper()])
    elif kind == 6:
      text = " ".join(pick(words) for _ in range(rng.integers(1, 5)))
    elif kind == 7:
      text = command + pick([".", "!", "\n", "?", " please"])
    else:
      text = command
    thought = " ".join(pick(words) for _ in range(rng.integers(0, 4)))
    form = rng.random()
    if table.think:
      text = (f"<think>{thought}</think>{text}" if form < 0.7 else text if form < 0.8 else f"<think>{text}"
              if form < 0.9 else pick([f"</think>{text}", f"<think></think><think>{thought}</think>{text}",
                                       f"<think>{thought}</think> {text}"]))
    elif form < 0.15:
      text = f"<think>{thought}</think>{text}"
    texts.append(text)
  a = env.max_action_len
  ends = [[tok.end_of_step_id], [tok.eos_id], []]
  encoded = [(tok.encode(text) + ends[rng.choice(3, p=[0.8, 0.1, 0.1])])[:a] for text in texts]
  ids = np.zeros((size, a), np.int32)
  for i, e in enumerate(encoded):
    ids[i, :len(e)] = e
  return ids, np.asarray([len(e) for e in encoded], np.int32)


# ----------------------------------------------------------------------------------------------------------------
# The checker.

def _tree_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def _tree_equal(a, b) -> Array:
  same = jax.tree_util.tree_map(lambda x, y: jnp.all(x == y), a, b)
  return functools.reduce(jnp.logical_and, jax.tree_util.tree_leaves(same), jnp.bool_(True))


def _shape_ok(obs, obs_len, reward, flags, max_obs_len) -> bool:
  """Static: checked once at trace time."""
  return (obs.shape == (max_obs_len,) and obs.dtype == jnp.int32 and obs_len.shape == () and obs_len.dtype == jnp.int32
          and reward.shape == () and reward.dtype == jnp.float32 and all(f.shape == () and f.dtype == bool
                                                                           for f in flags))


def _obs_checks(env, obs, obs_len, bound) -> dict:
  vocab, pad = env.tokenizer.vocab_size, env.tokenizer.pad_id
  pos = jnp.arange(obs.shape[0])
  return {"obs_vocab": (jnp.all((obs >= 0) & (obs < vocab)), jnp.max(jnp.where((obs >= 0) & (obs < vocab), 0, obs))),
          "obs_len": ((obs_len >= 0) & (obs_len <= bound) & (obs_len <= obs.shape[0]), obs_len),
          "obs_padding": (jnp.all(jnp.where(pos < obs_len, obs != pad, obs == 0)), obs_len)}


def _make_runner(env, spec: EnvSpec, num_steps: int, batch_size: int, obs_bound: int, optimize: bool = True):
  """-> (run, names): (key, params, weights [K], jitter, num_valid) -> (failed checks [C], first failure (sequence
  [C], step [C], value [C]), stats [len(STATS) + len(KINDS)], longest obs_len) of one batch, and the C check names
  (filled when `run` is first traced)."""
  table, tok = command_table(env), env.tokenizer
  # Action ids come from the model's vocabulary: the tokenizer's, rounded up to 64 (experiments/runner.py), so an
  # untrained policy can write ids the tokenizer does not have.
  a, vocab = env.max_action_len, -(-tok.vocab_size // 64) * 64
  pool_ids, pool_lens = (jnp.asarray(x) for x in action_pool(env, spec.extra_words(env)))
  stops = jnp.asarray([tok.end_of_step_id, tok.eos_id, tok.pad_id], jnp.int32)
  num_commands = len(table.commands)
  num_bits = 4 + 8 + len(KINDS) + num_steps * (NUM_DRAWS + a)  # key data, params, mix, steps
  max_think = max(0, min(16, a - table.max_command_len - 3))
  pos = jnp.arange(a)

  def command_action(command, draws, tokens):
    """A random command of the table, canonical, in the env's step format (a random think section)."""
    if not table.think:
      return table.encode(command, a, tok.end_of_step_id)
    n = draws[7] % (max_think + 1)
    content = jnp.where(tokens[:max_think] == table.think_close, table.think_open, tokens[:max_think])
    k = jnp.arange(max_think + 2)
    prefix = jnp.where(k == 0, table.think_open, jnp.where(k == n + 1, table.think_close,
                                                           jnp.take(content, k - 1, mode="clip")))
    ids, length = table.encode(command, a, tok.end_of_step_id, prefix=(prefix.astype(jnp.int32), n + 2))
    return ids, jnp.minimum(length, a)

  def make_action(kind, draws, tokens, expert):
    command, command_len = command_action(draws[1] % num_commands, draws, tokens)
    mutated, mutated_len = pool_ids[draws[2] % POOL_SIZE], pool_lens[draws[2] % POOL_SIZE]
    random_len = draws[3] % (a + 1)
    random_tokens = jnp.where(pos < random_len, tokens, 0)
    # Stops: a command or pool entry with stop ids overwritten, appended, at the front, or in place of the last.
    use_pool = draws[6] % 2 == 0
    base, base_len = jnp.where(use_pool, mutated, command), jnp.where(use_pool, mutated_len, command_len)
    stop = stops[draws[5] % 3]
    variant = (draws[6] >> 1) % 4
    at = draws[4] % jnp.maximum(base_len, 1)
    extra = 1 + draws[4] % 4
    per_pos_stop = stops[tokens % 3]
    overwrite = jnp.where(pos == at, stop, base)
    appended = jnp.where((pos >= base_len) & (pos < base_len + extra), per_pos_stop, base)
    front = jnp.where(pos == 0, stop, jnp.take(base, pos - 1, mode="clip"))
    last = jnp.where(pos == base_len - 1, stop, base)
    stopped = jnp.stack([overwrite, appended, front, last])[variant]
    stopped_len = jnp.stack([base_len, jnp.minimum(base_len + extra, a), jnp.minimum(base_len + 1, a),
                             base_len])[variant]
    empty = jnp.where(draws[6] % 2 == 0, 0, tokens)
    # Max length: random tokens, a command padded with stop ids, or a command followed by garbage.
    full = jnp.stack([tokens, jnp.where(pos < base_len, base, per_pos_stop),
                      jnp.where(pos < base_len, base, tokens)])[draws[5] % 3]
    actions = jnp.stack([expert[0], command, mutated, random_tokens, stopped, empty, full])
    lengths = jnp.stack([expert[1], command_len, mutated_len, random_len, stopped_len, jnp.int32(0), jnp.int32(a)])
    return actions[kind].astype(jnp.int32), lengths[kind].astype(jnp.int32)

  def step_checks(params, state, action, action_len, kind, step_key):
    next_state, obs, obs_len, reward, terminated, truncated, info = env.step(step_key, state, action, action_len,
                                                                               params)
    out = dict(obs=obs, obs_len=obs_len, reward=reward, terminated=terminated, truncated=truncated, info=info)
    lo, hi = spec.reward_range(params)
    was_done, done = state.done, next_state.done
    max_steps = jnp.asarray(params.max_steps, jnp.int32)
    shapes = _shape_ok(obs, obs_len, reward, (terminated, truncated, info.parsed, info.success, done), env.max_obs_len)
    checks = {
        "shapes": (jnp.bool_(shapes), 0),
        "finite": (_tree_finite(next_state) & jnp.isfinite(reward), reward),
        "reward_range": ((reward >= lo) & (reward <= hi), reward),
        "done_monotone": (~was_done | done, done),
        "done_flags": ((done == (was_done | terminated | truncated)) & ~(terminated & truncated)
                       & ~(was_done & (terminated | truncated)), 0),
        "noop_after_done": (~was_done | (_tree_equal(state, next_state) & (reward == 0) & (obs_len == 0)
                                         & jnp.all(obs == 0) & ~info.parsed & ~info.success), reward),
        "step_count": (next_state.step_count == state.step_count + jnp.where(was_done, 0, 1), next_state.step_count),
        "step_budget": ((next_state.step_count <= jnp.maximum(max_steps, 1))
                        & ((next_state.step_count < max_steps) | done)
                        & (~truncated | (next_state.step_count == max_steps)), next_state.step_count),
        **_obs_checks(env, obs, obs_len, obs_bound),
        "obs_nonempty": (was_done | (obs_len >= 1), obs_len),
        "success_terminates": (~info.success | terminated, 0),
        "parsing": (was_done | jnp.where((kind == EXPERT) | (kind == COMMAND), info.parsed,
                                         (kind != EMPTY) | ~info.parsed), kind),
    }
    checks.update(spec.state_checks(env, next_state))
    checks.update(spec.transition_checks(env, params, state, next_state, out))
    stats = dict(parsed=info.parsed, success=info.success, terminated=terminated, truncated=truncated,
                 after_done=was_done, obs_len=obs_len)
    return next_state, checks, stats

  names = []  # the check names in a fixed order, set when the step is traced

  def pack(checks):
    """{name: (ok, value)} -> (ok [C] bool, value [C] float32) in `names` order (absent checks pass)."""
    get = lambda n: checks.get(n, (True, 0))
    return (jnp.stack([jnp.asarray(get(n)[0], bool) for n in names]),
            jnp.stack([jnp.asarray(get(n)[1], jnp.float32) for n in names]))

  def sequence(bits, params, weights, jitter):
    reset_key, step_key = (jax.random.wrap_key_data(bits[i:i + 2], impl="threefry2x32") for i in (0, 2))
    bits = bits[4:]
    param_bits, mix_bits = bits[:8], bits[8:8 + len(KINDS)]
    draws = bits[8 + len(KINDS):].reshape(num_steps, NUM_DRAWS + a)
    params = spec.vary_params(env, param_bits, params, num_steps)
    own_mix = -jnp.log(1.0 - _uniform(mix_bits))  # Dirichlet(1): a per-sequence random mix of kinds
    mix = (1.0 - jitter) * weights / jnp.sum(weights) + jitter * own_mix / jnp.sum(own_mix)
    edges = jnp.cumsum(mix) / jnp.sum(mix)

    state, obs, obs_len = env.reset(reset_key, params)
    reset = {"shapes": (jnp.bool_(_shape_ok(obs, obs_len, jnp.float32(0), (state.done,), env.max_obs_len)), 0),
             "finite": (_tree_finite(state), 0), **_obs_checks(env, obs, obs_len, obs_bound),
             "obs_nonempty": (obs_len >= 1, obs_len),
             "reset_state": ((state.step_count == 0) & ~state.done, state.step_count),
             **spec.state_checks(env, state)}

    def body(state, step_draws):
      kind = jnp.minimum(jnp.sum(_uniform(step_draws[0]) >= edges), len(KINDS) - 1)
      draws = (step_draws[:NUM_DRAWS] >> 1).astype(jnp.int32)
      tokens = (step_draws[NUM_DRAWS:] % vocab).astype(jnp.int32)
      expert = env.expert_action(step_key, state, params)
      action, action_len = make_action(kind, draws, tokens, expert)
      next_state, checks, stats = step_checks(params, state, action, action_len, kind, step_key)
      if not names:
        names.extend(sorted(checks.keys() | reset.keys()))
      counts = jnp.concatenate([jnp.stack([stats[n] for n in STATS]).astype(jnp.int32),
                                jax.nn.one_hot(kind, len(KINDS), dtype=jnp.int32)])
      return next_state, (*pack(checks), counts, stats["obs_len"])

    _, (ok, value, counts, lengths) = jax.lax.scan(body, state, draws)
    reset_ok, reset_value = pack(reset)
    return (jnp.concatenate([reset_ok[None], ok]), jnp.concatenate([reset_value[None], value]), counts,
            jnp.maximum(obs_len, jnp.max(lengths)))

  # XLA's backend optimisation takes most of the compile time; small runs (the suite) do better without it.
  @functools.partial(jax.jit, compiler_options=None if optimize else {"xla_backend_optimization_level": 0})
  def check(bits, params, weights, jitter, num_valid):
    ok, value, counts, longest = jax.vmap(sequence, in_axes=(0, None, None, None))(bits, params, weights, jitter)
    valid = jnp.arange(batch_size) < num_valid
    failed = (~ok & valid[:, None, None]).reshape(-1, len(names)).T  # [C, B * (T + 1)]
    index = jnp.argmax(failed, axis=1)
    values = value.reshape(-1, len(names)).T
    first = (index // (num_steps + 1), index % (num_steps + 1), values[jnp.arange(len(names)), index])
    totals = jnp.sum(counts * valid[:, None, None], axis=(0, 1))
    return jnp.sum(failed, axis=1), first, totals, jnp.max(jnp.where(valid, longest, 0))

  def run(key, params, weights, jitter, num_valid):
    """The batch's random bits come from numpy, seeded by `key`: no threefry to compile (it is slow to)."""
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    bits = np.random.default_rng(seed).integers(0, 2 ** 32, (batch_size, num_bits), dtype=np.uint32)
    return check(bits, params, weights, jitter, num_valid)

  return run, names


@functools.cache
def _runner(env, spec, num_steps, batch_size, obs_bound, optimize):
  return _make_runner(env, spec, num_steps, batch_size, obs_bound, optimize)


def fuzz_env(env, params, key, num_sequences: int, *, num_steps: int | None = None, batch_size: int = 1000,
             weights=None, jitter: float = 1.0, spec: EnvSpec | None = None, obs_bound: int | None = None,
             name: str | None = None, optimize: bool = True) -> FuzzReport:
  """Runs `num_sequences` random action sequences of `num_steps` steps through `env` (vmapped, `batch_size` per
  jitted call) and checks every invariant on the reset and every step -> FuzzReport.

  `weights` [len(KINDS)]: the mix of action kinds (default uniform); each sequence uses `(1 - jitter) * weights +
  jitter * its own random mix`. `spec`: the env's EnvSpec (default `SPECS[env.name]`). `obs_bound`: the largest
  allowed obs_len (default the env's computed worst case). `optimize=False` compiles without XLA's backend
  optimisation: about 2.5x faster to compile, 4x slower to run (for a few hundred sequences). The compiled function
  is cached per (env, spec, num_steps, batch_size, obs_bound, optimize): calls that differ only in params, key,
  weights or jitter reuse it."""
  spec = SPECS[env.name] if spec is None else spec
  num_steps = spec.num_steps if num_steps is None else num_steps
  obs_bound = computed_obs_bound(env) if obs_bound is None else obs_bound
  batch_size = min(batch_size, num_sequences)
  run, names = _runner(env, spec, num_steps, batch_size, obs_bound, optimize)  # names: filled by the first trace
  weights = jnp.ones((len(KINDS),), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  report = FuzzReport(name=name or env.name, obs_bound=obs_bound)
  totals = 0
  for batch, start in enumerate(range(0, num_sequences, batch_size)):
    count = min(batch_size, num_sequences - start)
    batch_key = jax.random.fold_in(key, batch)
    failed, first, stats, longest = jax.device_get(run(batch_key, params, weights, jnp.float32(jitter),
                                                       jnp.int32(count)))
    report.longest_obs = max(report.longest_obs, int(longest))
    for c, check in enumerate(names):
      if not failed[c]:
        continue
      count, message = report.failures.get(check, (0, None))
      if message is None:  # the first failure of this check
        b, t, value = (x[c] for x in first)
        where = "reset" if t == 0 else f"step {int(t)}"
        doc = GENERIC_CHECKS.get(check) or ENV_CHECKS.get(check, check)
        message = f"sequence {start + int(b)}, {where}: {doc} (value {float(value):g})"
      report.failures[check] = (count + int(failed[c]), message)
    totals = totals + stats
  report.checks = tuple(names)
  report.sequences, report.steps = num_sequences, num_sequences * num_steps
  report.stats = dict(zip(STATS, map(int, totals[:len(STATS)])))
  report.stats["kinds"] = dict(zip(KINDS, map(int, totals[len(STATS):])))
  return report


# ----------------------------------------------------------------------------------------------------------------
# The drill.

def _padded(make):
  """The env `make(**kw)` builds, with OBS_SLACK spare observation tokens (so a too-long observation is seen)."""
  return make(max_obs_len=make().max_obs_len + OBS_SLACK)


def drill_envs() -> dict[str, Callable[[], Any]]:
  """name -> builder of every JAX environment configuration the drill covers (step formats, tokenizers, modes,
  smallest and largest static sizes); hop counts, grid sizes, layouts and budgets vary per sequence."""
  byte, think = ByteTokenizer(), ByteTokenizer(extra_special_tokens=THINK_TOKENS)
  word = WordTokenizer(lookup_qa.vocabulary())
  word_think = WordTokenizer(lookup_qa.vocabulary(), extra_special_tokens=THINK_TOKENS)
  lq, gn, tw = lookup_qa.LookupQA, grid_nav.GridNav, textworld_lite.TextWorldLite
  p = functools.partial
  return {
      "lookup_qa/plain": lambda: _padded(p(lq, byte)),
      "lookup_qa/think": lambda: _padded(p(lq, think, step_format="think")),
      "lookup_qa/plain/word": lambda: _padded(p(lq, word)),
      "lookup_qa/think/word/fact": lambda: _padded(p(lq, word_think, step_format="think", think_wording="fact")),
      "lookup_qa/plain/smallest": lambda: _padded(p(lq, byte, num_entities=3, max_hops=2)),
      "grid_nav/plain": lambda: _padded(p(gn, byte)),
      "grid_nav/think": lambda: _padded(p(gn, think, step_format="think")),
      "grid_nav/plain/max_size_10": lambda: _padded(p(gn, byte, max_size=10)),
      "textworld_lite/plain": lambda: _padded(p(tw, byte)),
      "textworld_lite/think": lambda: _padded(p(tw, think, step_format="think")),
      "textworld_lite/plain/admissible/smallest": lambda: _padded(p(tw, byte, num_rooms=2, num_objects=1,
                                                                    num_containers=1, list_admissible=True)),
      "textworld_lite/think/admissible/largest": lambda: _padded(p(tw, think, num_rooms=6, num_objects=6,
                                                                   num_containers=4, list_admissible=True,
                                                                   step_format="think")),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sequences", type=int, default=10000, help="random action sequences per env")
  parser.add_argument("--batch", type=int, default=1000, help="sequences per jitted call")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--envs", default="", help="comma-separated name prefixes (default: all)")
  args = parser.parse_args(argv)
  wanted = [w for w in args.envs.split(",") if w]
  total_sequences = total_steps = total_violations = 0
  start = time.perf_counter()
  for index, (name, build) in enumerate(drill_envs().items()):
    if wanted and not any(name.startswith(w) for w in wanted):
      continue
    began = time.perf_counter()
    env = build()
    report = fuzz_env(env, env.default_params(), jax.random.fold_in(jax.random.key(args.seed), index),
                      args.sequences, batch_size=args.batch, name=name)
    s = report.stats
    print(f"{name}: {report.sequences} sequences, {report.steps} steps, {report.violations} violations "
          f"({len(report.checks)} invariants; parsed {s['parsed']}, success {s['success']}, terminated "
          f"{s['terminated']}, truncated {s['truncated']}, after done {s['after_done']}; longest obs "
          f"{report.longest_obs}/{report.obs_bound}; "
          f"{time.perf_counter() - began:.1f} s)", flush=True)
    for message in report.messages:
      print(f"  {message}", flush=True)
    total_sequences += report.sequences
    total_steps += report.steps
    total_violations += report.violations
  print(f"wall time {time.perf_counter() - start:.0f} s")
  print(f"fuzz drill: {total_sequences} sequences, {total_steps} env steps, {total_violations} invariant violations")
  return 1 if total_violations else 0


if __name__ == "__main__":
  raise SystemExit(main())
