"""grid_nav: a text FrozenLake with an optional key and locked goal (the long-horizon environment).

Each episode draws, from its reset key, a `size` x `size` grid (inside a static max_size x max_size buffer): a start,
a goal, holes, and with `use_key` a key that must be taken before the goal opens. The agent only sees its
surroundings, so reaching the goal takes many steps:

    Goal (4,3), avoid holes. Moves: north, south, east, west; y grows south.
    Get the key at (0,2) first.
    At (1,0): north wall, south hole, east ice, west ice.
    > west
    At (0,0): north wall, south ice, east ice, west wall.
    > south
    At (0,1): north ice, south key, east hole, west wall.
    > south
    You took the key. At (0,2): north ice, south ice, east ice, west wall.
    > ...

Moving into the border leaves the agent in place ("Blocked by a wall."), as does moving onto the locked goal
("Locked: get the key first."); the key is taken by stepping on it. Rewards: 1.0 on reaching the goal (terminated,
success), 0.0 for falling into a hole (terminated), `params.invalid_penalty` for an action that spells no move,
0.0 otherwise; `params.max_steps` truncates. Bumping into the border or the locked goal is a legal move (parsed,
no penalty): the feedback says what happened.

Solvable by construction: an L-shaped hole-free corridor is carved from the start to the key and from the key to
the goal, and the goal is placed off the first corridor, so the key never sits behind the locked goal. Holes fall
elsewhere with probability `hole_prob`. The goal is drawn at Manhattan distance >= size - 1 from the start when
such a cell is free. Without a key the start->key corridor is empty (key = start).

The scripted expert walks a shortest path (BFS distances by fixed-iteration relaxation in JAX) to the key, then to
the goal: success 1.0 whenever max_steps >= the path length, which is at most 2 (size - 1) without a key and
4 (size - 1) with one (the corridors bound it; at the defaults the expert takes 8.4 steps on average, 15 at most).
Uniformly random moves succeed rarely: measured over 2048 episodes, 0.024 at the defaults (size 6, key, holes 0.2),
0.12 at size 5 without a key, 0.009 at size 7 with a key; random tokens never parse (0.0).

Sizes with ByteTokenizer (max_size 7): initial observation <= 159 tokens with the key line, <= 131 without; later
observations <= 85; max_obs_len 159. The expert's actions take 6 tokens plain (`north` + end of step), 23 with its
think section.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax.checks import check_choice, check_int, fail
from stepjax.envs.base import CommandTable, Environment, Fragments, StepInfo, host_array
from stepjax.tokenizers import Tokenizer

Array = Any

DIRECTIONS = ("north", "south", "east", "west")
# (dx, dy) of each direction; y grows south, so north is -y.
DIRECTION_DELTAS = np.asarray([[0, -1], [0, 1], [1, 0], [-1, 0]], np.int32)
CELL_KINDS = ("wall", "ice", "hole", "goal", "key")
WALL, ICE, HOLE, GOAL, KEY = range(len(CELL_KINDS))
STEP_FORMATS = ("plain", "think")
SUCCESS_REWARD = 1.0

INTRO_TEXT = "), avoid holes. Moves: north, south, east, west; y grows south.\n"
INVALID_TEXT = "Invalid action. Moves: north, south, east, west.\n> "
STATUS_TEXTS = ("Blocked by a wall. ", "Locked: get the key first. ", "You took the key. ")
BLOCKED, LOCKED, TOOK_KEY = range(len(STATUS_TEXTS))
FELL_TEXT = "You fell into a hole.\n"
REACHED_TEXT = "You reached the goal!\n"
# The expert's think sections (step_format="think"): where it is heading.
THINK_KEY_TEXT = "<think>Go to the key.</think>"
THINK_GOAL_TEXT = "<think>Go to the goal.</think>"


@struct.dataclass
class GridNavParams:
  """Traced per-run settings; difficulty = `size` (clipped to [3, max_size]), `hole_prob`, `use_key`.
  `max_steps` truncates; `invalid_penalty` is added for an action that spells no move (0.0 keeps the reward sparse)."""

  size: int = 6
  hole_prob: float = 0.2
  use_key: bool = True
  max_steps: int = 32
  invalid_penalty: float = 0.0


@struct.dataclass
class GridNavState:
  """One episode. Cells are (x, y) = (column, row); S = max_size."""

  holes: Array  # [S, S] bool indexed [y, x]; False outside the size x size square
  size: Array  # [] int32
  position: Array  # [2] int32 (x, y)
  goal: Array  # [2] int32
  key_position: Array  # [2] int32 (= the start when no key is needed)
  needs_key: Array  # [] bool
  has_key: Array  # [] bool
  step_count: Array  # [] int32: steps taken (counted by `Environment.step`)
  done: Array  # [] bool: terminated or truncated (set by `Environment.step`)
  success: Array  # [] bool
  fell: Array  # [] bool


class GridNav(Environment):
  """Text grid navigation; see the module docstring.

  Static settings: `max_size` (3..10, the buffer side), `max_obs_len` (default: the worst case; a larger value
  pads, a smaller one is a ValueError), `max_action_len` (default 24 plain, 64 think), `step_format` ("plain", or
  "think": `<think>...</think>` then exactly one move).
  """

  name = "grid_nav"

  def __init__(self, tokenizer: Tokenizer, *, max_size: int = 7, max_obs_len: int | None = None,
               max_action_len: int | None = None, step_format: str = "plain"):
    check_choice(step_format, "step_format", STEP_FORMATS)
    if not 3 <= check_int(max_size, "max_size") <= 10:  # Coordinates are written as single digits.
      fail("max_size", f"expected 3 ... 10, got {max_size}")
    self.tokenizer = tokenizer
    self.max_size = max_size
    self.step_format = step_format
    self.commands = CommandTable(tokenizer, DIRECTIONS, think=step_format == "think")
    self._think_key_ids = tokenizer.encode(THINK_KEY_TEXT) if step_format == "think" else []
    self._think_goal_ids = tokenizer.encode(THINK_GOAL_TEXT) if step_format == "think" else []

    texts: list[str] = []

    def add(*pieces: str) -> int:
      texts.extend(pieces)
      return len(texts) - len(pieces)

    self._digit0 = add(*[str(d) for d in range(10)])
    self._kind0 = add(*CELL_KINDS)
    self._status0 = add(*STATUS_TEXTS)
    self._goal_at = add("Goal (")
    self._intro = add(INTRO_TEXT)
    self._key_at = add("Get the key at (")
    self._key_end = add(") first.\n")
    self._at = add("At (")
    self._comma = add(",")
    self._direction_labels = add("): north ", ", south ", ", east ", ", west ")
    self._local_end = add(".\n> ")
    self._fell = add(FELL_TEXT)
    self._reached = add(REACHED_TEXT)
    self._invalid = add(INVALID_TEXT)
    self.fragments = Fragments(tokenizer, texts)

    longest_digit = self.fragments.longest(range(self._digit0, self._digit0 + 10))
    longest_kind = self.fragments.longest(range(self._kind0, self._kind0 + len(CELL_KINDS)))
    longest_status = self.fragments.longest(range(self._status0, self._status0 + len(STATUS_TEXTS)))
    local = [self._at, longest_digit, self._comma, longest_digit] + sum(
        ([self._direction_labels + d, longest_kind] for d in range(len(DIRECTIONS))), []) + [self._local_end]
    goal_line = [self._goal_at, longest_digit, self._comma, longest_digit, self._intro]
    key_line = [self._key_at, longest_digit, self._comma, longest_digit, self._key_end]
    worst_cases = {
        "initial": goal_line + key_line + local,
        "initial_without_key": goal_line + local,
        "move": [longest_status] + local,
        "end": [self.fragments.longest([self._fell, self._reached])],
        "invalid": [self._invalid],
    }
    self._num_slots = len(worst_cases["initial"])
    self.max_obs_lens = {kind: self.fragments.max_len_of(slots) for kind, slots in worst_cases.items()}
    worst = max(self.max_obs_lens.values())
    if max_obs_len is not None and max_obs_len < worst:
      fail("max_obs_len", f"an observation can take {worst} tokens with this tokenizer, got {max_obs_len}")
    self.max_obs_len = worst if max_obs_len is None else max_obs_len

    longest_think = max(len(self._think_key_ids), len(self._think_goal_ids))
    expert_len = longest_think + int(self.commands.lengths.max()) + 1
    self.max_action_len = (24 if step_format == "plain" else 64) if max_action_len is None else max_action_len
    if self.max_action_len < expert_len:
      fail("max_action_len", f"the expert's actions take up to {expert_len} tokens, got {max_action_len}")

  def default_params(self) -> GridNavParams:
    return GridNavParams()

  # --------------------------------------------------------------------------------------------------------------
  # Grid helpers. Cells are (x, y); arrays over the grid are [S, S] indexed [y, x].

  def _cell_grids(self) -> tuple[Array, Array]:
    """-> (xs, ys), each [S, S] int32."""
    ys, xs = jnp.meshgrid(jnp.arange(self.max_size), jnp.arange(self.max_size), indexing="ij")
    return xs, ys

  def _random_cell(self, scores: Array, allowed: Array) -> Array:
    """The cell of highest score [S, S] (uniform in [0, 1)) where `allowed` [S, S] -> [2] int32 (x, y)."""
    flat = jnp.argmax(jnp.where(allowed, scores, -1.0))
    return jnp.stack([flat % self.max_size, flat // self.max_size]).astype(jnp.int32)

  def _l_corridor(self, start: Array, end: Array, horizontal_first: Array) -> Array:
    """The cells of an L-shaped walk from `start` to `end` -> [S, S] bool."""
    xs, ys = self._cell_grids()

    def between(v, a, b):
      return (v >= jnp.minimum(a, b)) & (v <= jnp.maximum(a, b))

    along_x_then_y = (((ys == start[1]) & between(xs, start[0], end[0]))
                      | ((xs == end[0]) & between(ys, start[1], end[1])))
    along_y_then_x = (((xs == start[0]) & between(ys, start[1], end[1]))
                      | ((ys == end[1]) & between(xs, start[0], end[0])))
    return jnp.where(horizontal_first, along_x_then_y, along_y_then_x)

  def _inside(self, state: GridNavState, cell: Array) -> Array:
    return jnp.all((cell >= 0) & (cell < state.size), axis=-1)

  def _cell_kind(self, state: GridNavState, cell: Array) -> Array:
    """cell [..., 2] (x, y), possibly off the grid -> kind id [...] (WALL, ICE, HOLE, GOAL, KEY)."""
    last = self.max_size - 1
    hole = state.holes[jnp.clip(cell[..., 1], 0, last), jnp.clip(cell[..., 0], 0, last)]
    is_goal = jnp.all(cell == state.goal, axis=-1)
    is_key = state.needs_key & ~state.has_key & jnp.all(cell == state.key_position, axis=-1)
    kind = jnp.where(hole, HOLE, jnp.where(is_goal, GOAL, jnp.where(is_key, KEY, ICE)))
    return jnp.where(self._inside(state, cell), kind, WALL).astype(jnp.int32)

  def _distances_to(self, state: GridNavState, target: Array, goal_open: Array) -> Array:
    """BFS step counts from every cell to `target` [2], avoiding holes, the border and (unless `goal_open`) the
    goal -> [S, S] int32, `S * S` where unreachable. A fixed S * S rounds of relaxation cover every path."""
    xs, ys = self._cell_grids()
    unreachable = self.max_size * self.max_size
    is_goal = (xs == state.goal[0]) & (ys == state.goal[1])
    passable = (xs < state.size) & (ys < state.size) & ~state.holes & (goal_open | ~is_goal)
    distance = jnp.where((xs == target[0]) & (ys == target[1]), 0, unreachable)

    def relax(_, distance):
      padded = jnp.pad(distance, 1, constant_values=unreachable)
      nearest_neighbour = jnp.minimum(jnp.minimum(padded[:-2, 1:-1], padded[2:, 1:-1]),
                                      jnp.minimum(padded[1:-1, :-2], padded[1:-1, 2:]))
      return jnp.where(passable, jnp.minimum(distance, nearest_neighbour + 1), distance)

    return jax.lax.fori_loop(0, unreachable, relax, distance)

  # --------------------------------------------------------------------------------------------------------------
  # Observations: fixed-size slot vectors of fragment indices (-1 = nothing), composed into tokens.

  def _pad_slots(self, slots: Array) -> Array:
    slots = jnp.asarray(slots, jnp.int32)
    return jnp.concatenate([slots, jnp.full((self._num_slots - slots.shape[0],), -1, jnp.int32)])

  def _coordinate_slots(self, cell: Array) -> Array:
    """(x, y) -> the slots of "x,y" [3]."""
    return jnp.stack([self._digit0 + cell[0], jnp.int32(self._comma), self._digit0 + cell[1]])

  def _local_slots(self, state: GridNavState) -> Array:
    """"At (x,y): north ice, south hole, east wall, west goal.\\n> " -> [15] (no status)."""
    neighbours = state.position[None, :] + jnp.asarray(DIRECTION_DELTAS)
    labelled_kinds = jnp.stack([self._direction_labels + jnp.arange(len(DIRECTIONS)),
                                self._kind0 + self._cell_kind(state, neighbours)], axis=1).reshape(-1)
    return jnp.concatenate([jnp.asarray([self._at], jnp.int32), self._coordinate_slots(state.position),
                            labelled_kinds.astype(jnp.int32), jnp.asarray([self._local_end], jnp.int32)])

  def _initial_slots(self, state: GridNavState) -> Array:
    """Task line, key line (when a key is needed), then the surroundings -> [num_slots]."""
    goal_line = jnp.concatenate([jnp.asarray([self._goal_at], jnp.int32), self._coordinate_slots(state.goal),
                                 jnp.asarray([self._intro], jnp.int32)])
    key_line = jnp.concatenate([jnp.asarray([self._key_at], jnp.int32), self._coordinate_slots(state.key_position),
                                jnp.asarray([self._key_end], jnp.int32)])
    key_line = jnp.where(state.needs_key, key_line, -1)
    return self._pad_slots(jnp.concatenate([goal_line, key_line, self._local_slots(state)]))

  # --------------------------------------------------------------------------------------------------------------
  # The environment API.

  def reset(self, key: Array, params: GridNavParams) -> tuple[GridNavState, Array, Array]:
    """-> (state, obs [max_obs_len] int32, obs_len)."""
    size = jnp.clip(jnp.asarray(params.size, jnp.int32), 3, self.max_size)
    needs_key = jnp.asarray(params.use_key, bool)
    # One draw of random bits for the whole episode: each jax.random call costs seconds of XLA compile on CPU.
    cells = self.max_size * self.max_size
    uniforms = (jax.random.bits(key, (4 * cells + 2,), jnp.uint32) >> 8).astype(jnp.float32) * 2.0 ** -24
    start_scores, key_scores, goal_scores, hole_draws = uniforms[:4 * cells].reshape(4, self.max_size, self.max_size)
    first_turn, second_turn = uniforms[4 * cells:] < 0.5
    xs, ys = self._cell_grids()
    inside = (xs < size) & (ys < size)
    start = self._random_cell(start_scores, inside)
    is_start = (xs == start[0]) & (ys == start[1])
    key_position = jnp.where(needs_key, self._random_cell(key_scores, inside & ~is_start), start)
    to_key = self._l_corridor(start, key_position, first_turn)
    # The goal stays off the start->key corridor (so the locked goal never blocks the way to the key), far from the
    # start when such a cell is free.
    goal_allowed = inside & ~to_key
    far = (jnp.abs(xs - start[0]) + jnp.abs(ys - start[1])) >= size - 1
    goal = self._random_cell(goal_scores, jnp.where(jnp.any(goal_allowed & far), goal_allowed & far, goal_allowed))
    to_goal = self._l_corridor(key_position, goal, second_turn)
    holes = (hole_draws < params.hole_prob) & inside & ~to_key & ~to_goal
    state = GridNavState(holes=holes, size=size, position=start, goal=goal, key_position=key_position,
                         needs_key=needs_key, has_key=jnp.bool_(False), step_count=jnp.int32(0),
                         done=jnp.bool_(False), success=jnp.bool_(False), fell=jnp.bool_(False))
    obs, obs_len = self.fragments.compose(self._initial_slots(state), self.max_obs_len)
    return state, obs, obs_len

  def step_env(self, key: Array, state: GridNavState, action: Array, action_len: Array, params: GridNavParams):
    """One transition of a running episode (`Environment.step` adds the step budget and the no-op after the end):
    action [A] int32 (A any), action_len [] -> (state, obs [max_obs_len] int32, obs_len, reward, terminated,
    StepInfo)."""
    del key  # Deterministic transitions.
    command = self.commands.match(action, action_len)
    parsed = command >= 0
    target = state.position + jnp.asarray(DIRECTION_DELTAS)[jnp.maximum(command, 0)]
    target_kind = self._cell_kind(state, target)
    goal_open = ~state.needs_key | state.has_key
    blocked = parsed & (target_kind == WALL)
    locked = parsed & (target_kind == GOAL) & ~goal_open
    moved = parsed & ~blocked & ~locked
    took_key = moved & (target_kind == KEY)
    fell = moved & (target_kind == HOLE)
    reached = moved & (target_kind == GOAL)
    terminated = fell | reached
    reward = jnp.where(reached, SUCCESS_REWARD, 0.0) + jnp.where(parsed, 0.0, params.invalid_penalty)
    next_state = state.replace(position=jnp.where(moved, target, state.position), has_key=state.has_key | took_key,
                               success=reached, fell=fell)

    status = jnp.where(blocked, self._status0 + BLOCKED,
                       jnp.where(locked, self._status0 + LOCKED, jnp.where(took_key, self._status0 + TOOK_KEY, -1)))
    move_slots = self._pad_slots(jnp.concatenate([status[None], self._local_slots(next_state)]))
    end_slots = self._pad_slots(jnp.where(fell, self._fell, self._reached)[None])
    invalid_slots = self._pad_slots([self._invalid])
    slots = jnp.where(terminated, end_slots, jnp.where(parsed, move_slots, invalid_slots))
    obs, obs_len = self.fragments.compose(slots, self.max_obs_len)
    return next_state, obs, obs_len, reward, terminated, StepInfo(parsed, reached)

  def expert_action(self, key: Array, state: GridNavState, params: GridNavParams) -> tuple[Array, Array]:
    """One step along a shortest path to the key while it is needed, then to the goal (ties: north, south, east,
    west). -> (tokens [max_action_len] int32, length)."""
    del key, params
    goal_open = ~state.needs_key | state.has_key
    target = jnp.where(goal_open, state.goal, state.key_position)
    distance = self._distances_to(state, target, goal_open)
    neighbours = state.position[None, :] + jnp.asarray(DIRECTION_DELTAS)
    last = self.max_size - 1
    neighbour_distance = distance[jnp.clip(neighbours[:, 1], 0, last), jnp.clip(neighbours[:, 0], 0, last)]
    neighbour_distance = jnp.where(self._inside(state, neighbours), neighbour_distance, self.max_size ** 2)
    command = jnp.argmin(neighbour_distance).astype(jnp.int32)
    eos = self.tokenizer.end_of_step_id
    if self.step_format == "plain":
      return self.commands.encode(command, self.max_action_len, eos)
    key_tokens, key_len = self.commands.encode(command, self.max_action_len, eos, self._think_key_ids)
    goal_tokens, goal_len = self.commands.encode(command, self.max_action_len, eos, self._think_goal_ids)
    return jnp.where(goal_open, goal_tokens, key_tokens), jnp.where(goal_open, goal_len, key_len)

  def render(self, state: GridNavState) -> str:
    """The map ('@' agent, 'G' goal, 'K' key not yet taken, 'O' hole, '.' ice) under a status line."""
    s = jax.tree_util.tree_map(host_array, state)
    size = int(s.size)
    rows = []
    for y in range(size):
      row = []
      for x in range(size):
        cell = "O" if s.holes[y, x] else "."
        if s.needs_key and not s.has_key and (x, y) == tuple(s.key_position):
          cell = "K"
        if (x, y) == tuple(s.goal):
          cell = "G"
        if (x, y) == tuple(s.position):
          cell = "@"
        row.append(cell)
      rows.append(" ".join(row))
    x, y = s.position
    gx, gy = s.goal
    key = ""
    if s.needs_key:
      kx, ky = s.key_position
      key = f", key ({kx},{ky}) {'taken' if s.has_key else 'not taken'}"
    status = ("reached the goal" if s.success else "fell into a hole" if s.fell else "done (truncated)" if s.done
              else "running")
    return "\n".join([f"at ({x},{y}), goal ({gx},{gy}){key}; step {int(s.step_count)}, {status}", *rows])


