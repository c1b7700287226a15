"""TextWorldLite: an ALFWorld-like household task in pure JAX, on tokens.

A few rooms are joined by coloured doors into a random tree (a line is one case); doors and containers (box,
drawer, ...) may start closed; objects lie on a room's floor or inside a container. The goal is either
"put the X in the Y" (Y a container) or "take the X to the R" (holding X while standing in room R). Commands:

    look | go <room> | open <colour> door | open <container> | take <object> | put <object> in <container>
    | examine <colour> door | examine <container> | examine <object>

Reward is 1.0 on the step that achieves the goal (terminated), `params.invalid_penalty` for an action that does not
parse or is illegal in the current state (the world is left unchanged and a fixed feedback line is shown), 0
otherwise; after `params.max_steps` steps the episode is truncated.

Static settings (`num_rooms`, `num_objects`, `num_containers`) fix every array shape and the command table; the
names are the first entries of `ROOM_NAMES`, `DOOR_COLOURS`, `CONTAINER_NAMES` and `OBJECT_NAMES`. Traced
`TextWorldLiteParams` pick how much of that world an episode uses and how hard it is.

Observations are compositions of fragments tokenised once (`Fragments`), written by the mixin in
`textworld_lite_text` (this module is the world: layout, transitions, the expert); an example first observation:

    Goal: put the apple in the drawer.
    Commands: look, go <room>, open <x>, take <x>, put <x> in <y>, examine <x>.
    You are in the hall.
    Exits: red door to the kitchen, blue door (closed) to the study.
    You see: drawer.
    The drawer holds: key.
    >

Later observations give the effect of the action, followed by the room description when the player moved or looked.
With `list_admissible=True` every observation of a running episode ends with "Admissible: look, go kitchen, ...".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from stepjax.checks import check_choice, check_int, fail
from stepjax.envs.base import CommandTable, Environment, StepInfo, host_array
from stepjax.envs.textworld_lite_text import (EXAMINE_CONTAINER, EXAMINE_DOOR, EXAMINE_OBJECT, GO, LOOK, OPEN_CONTAINER,
                                              OPEN_DOOR, PUT, TAKE, TextWorldLiteText)
from stepjax.tokenizers import Tokenizer, pad_batch

Array = Any

ROOM_NAMES = ("hall", "kitchen", "study", "garden", "cellar", "attic")
DOOR_COLOURS = ("red", "blue", "green", "gray", "pink")  # door d joins room_order[d + 1] to an earlier room
CONTAINER_NAMES = ("box", "drawer", "chest", "safe")
OBJECT_NAMES = ("apple", "key", "book", "cup", "coin", "pen")

SUCCESS_REWARD = 1.0
STEP_FORMATS = ("plain", "think")


@struct.dataclass
class TextWorldLiteParams:
  """Traced per-run settings (vmap over them for curricula).

  num_rooms_used           rooms in an episode's layout, clipped to [2, num_rooms].
  num_distractors          objects besides the goal object, clipped to [0, num_objects - 1].
  door_closed_prob         probability that each door starts closed.
  container_closed_prob    probability that each container starts closed.
  put_goal_prob            probability of a "put X in Y" goal (else "take X to R").
  max_steps                the env's own step limit: the step that reaches it is truncated.
  invalid_penalty          reward of an unparseable or illegal action (default -0.1: a small push towards valid
                           commands that never outweighs the success reward 1.0).
  """

  num_rooms_used: Any
  num_distractors: Any
  door_closed_prob: Any = 0.5
  container_closed_prob: Any = 0.5
  put_goal_prob: Any = 0.5
  max_steps: Any = 24
  invalid_penalty: Any = -0.1


@struct.dataclass
class TextWorldLiteState:
  """One episode's world. R rooms, D = R - 1 door slots, C containers, O objects.

  room_active       [R] bool   rooms of this episode's layout.
  door_rooms        [D, 2] int32  the two rooms each door joins.
  door_active       [D] bool   doors of this episode's layout (they form a tree over the active rooms).
  door_open         [D] bool
  container_room    [C] int32  every container stands in an active room.
  container_open    [C] bool
  object_location   [O] int32  room r on its floor (0..R-1), inside container c (R + c), carried (R + C), absent (-1).
  player_room       [] int32
  goal_is_put       [] bool    "put goal_object in container goal_target", else "take goal_object to room goal_target".
  goal_object       [] int32
  goal_target       [] int32
  step_count        [] int32   steps taken so far (counted by `Environment.step`).
  done              [] bool    terminated or truncated: further steps are no-ops (`Environment.step`).
  """

  room_active: Array
  door_rooms: Array
  door_active: Array
  door_open: Array
  container_room: Array
  container_open: Array
  object_location: Array
  player_room: Array
  goal_is_put: Array
  goal_object: Array
  goal_target: Array
  step_count: Array
  done: Array


def _ranks(values: Array) -> Array:
  """[n] floats -> [n] int32 rank of each (0 = smallest, ties by position): a permutation of 0..n-1 from
  comparisons instead of a sort (tiny n, smaller compiled code)."""
  n = values.shape[0]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
  before = (values[None, :] < values[:, None]) | ((values[None, :] == values[:, None]) & earlier)
  return jnp.sum(before, axis=1).astype(jnp.int32)


def _inverse_permutation(permutation: Array) -> Array:
  """[n] a permutation of 0..n-1 -> [n] its inverse (rank -> item)."""
  n = permutation.shape[0]
  return jnp.argmax(permutation[None, :] == jnp.arange(n)[:, None], axis=1).astype(jnp.int32)


class TextWorldLite(TextWorldLiteText, Environment):
  """ALFWorld-like rooms/doors/containers/objects task (see the module docstring).

  Args:
    tokenizer: the run's tokenizer (fragments and commands are tokenised once with it).
    num_rooms: room slots, 2..6 (doors: num_rooms - 1).
    num_objects: object slots, 1..6.
    num_containers: container slots, 1..4 (all of them are placed in every episode).
    max_obs_len: observation buffer size; None = the computed worst case (a smaller value is a ValueError).
    max_action_len: action buffer size of the expert; None = the longest expert action.
    list_admissible: end every running observation with the admissible commands.
    step_format: "plain" (the action is one command) or "think" (`<think>...</think>` then one command; the
      tokenizer needs `<think>` and `</think>` as special tokens).
  """

  name = "textworld_lite"

  def __init__(self, tokenizer: Tokenizer, *, num_rooms: int = 4, num_objects: int = 3, num_containers: int = 2,
               max_obs_len: int | None = None, max_action_len: int | None = None, list_admissible: bool = False,
               step_format: str = "plain"):
    for field, value, low, high in (("num_rooms", num_rooms, 2, len(ROOM_NAMES)),
                                    ("num_objects", num_objects, 1, len(OBJECT_NAMES)),
                                    ("num_containers", num_containers, 1, len(CONTAINER_NAMES))):
      if not low <= check_int(value, field) <= high:
        fail(field, f"must lie in [{low}, {high}], got {value}")
    check_choice(step_format, "step_format", STEP_FORMATS)
    self.tokenizer = tokenizer
    self.num_rooms, self.num_objects, self.num_containers = num_rooms, num_objects, num_containers
    self.num_doors = num_rooms - 1
    self.list_admissible = list_admissible
    self.step_format = step_format
    self.carried = num_rooms + num_containers  # object_location code of a carried object
    num_doors = self.num_doors
    room_names = ROOM_NAMES[:num_rooms]
    door_names = [f"{colour} door" for colour in DOOR_COLOURS[:num_doors]]
    container_names = CONTAINER_NAMES[:num_containers]
    object_names = OBJECT_NAMES[:num_objects]
    self.room_names, self.door_names = room_names, door_names
    self.container_names, self.object_names = container_names, object_names

    # The command table, in the order `admissible_mask` lists it: (text, verb, argument, second argument).
    table = [("look", LOOK, 0, 0)]
    table += [(f"go {room}", GO, r, 0) for r, room in enumerate(room_names)]
    table += [(f"open {door}", OPEN_DOOR, d, 0) for d, door in enumerate(door_names)]
    table += [(f"open {box}", OPEN_CONTAINER, c, 0) for c, box in enumerate(container_names)]
    table += [(f"take {thing}", TAKE, o, 0) for o, thing in enumerate(object_names)]
    table += [(f"put {thing} in {box}", PUT, o, c) for o, thing in enumerate(object_names)
              for c, box in enumerate(container_names)]
    table += [(f"examine {door}", EXAMINE_DOOR, d, 0) for d, door in enumerate(door_names)]
    table += [(f"examine {box}", EXAMINE_CONTAINER, c, 0) for c, box in enumerate(container_names)]
    table += [(f"examine {thing}", EXAMINE_OBJECT, o, 0) for o, thing in enumerate(object_names)]
    self.commands = [entry[0] for entry in table]
    self.num_commands = len(table)
    self.command_verb = jnp.asarray([entry[1] for entry in table], jnp.int32)
    self.command_arg = jnp.asarray([entry[2] for entry in table], jnp.int32)
    self.command_arg2 = jnp.asarray([entry[3] for entry in table], jnp.int32)
    first = {}
    for i, entry in enumerate(table):
      first.setdefault(entry[1], i)
    self.verb_offset = first  # index of each verb's first command (host ints)
    self.command_table = CommandTable(tokenizer, self.commands, think=step_format == "think")

    self._init_text(tokenizer)
    worst_obs = self._worst_observation_len()
    if max_obs_len is None:
      max_obs_len = worst_obs
    if max_obs_len < worst_obs:
      fail("max_obs_len", f"the worst-case observation has {worst_obs} tokens, got {max_obs_len}")
    self.max_obs_len = int(max_obs_len)
    # The expert's think sections, one per plan: fetch each object, put each object in each container, take each
    # object to each room (tokenised once, like everything else).
    plans = [f"fetch the {thing}" for thing in object_names]
    plans += [f"put the {thing} in the {box}" for thing in object_names for box in container_names]
    plans += [f"take the {thing} to the {room}" for thing in object_names for room in room_names]
    encoded = tokenizer.encode_batch([f"<think>{plan}</think>" for plan in plans])
    self.max_think_len = max(len(e) for e in encoded) if step_format == "think" else 0
    think_ids, think_mask = pad_batch(encoded, max(len(e) for e in encoded), tokenizer.pad_id)
    self.think_ids, self.think_lengths = jnp.asarray(think_ids), jnp.asarray(think_mask.sum(axis=1), jnp.int32)
    worst_action = self.max_think_len + self.command_table.max_command_len + 1
    if max_action_len is None:
      max_action_len = worst_action
    if max_action_len < worst_action:
      fail("max_action_len", f"the longest expert action has {worst_action} tokens, got {max_action_len}")
    self.max_action_len = int(max_action_len)

  def _counts(self) -> tuple[int, int, int, int]:
    return self.num_rooms, self.num_doors, self.num_containers, self.num_objects

  # -- params ---------------------------------------------------------------------------------------------------
  def default_params(self) -> TextWorldLiteParams:
    """All rooms and objects used, half the doors/containers closed, max_steps = 4 * num_rooms + 8 (the expert
    needs at most 4 * num_rooms), invalid_penalty = -0.1."""
    return TextWorldLiteParams(num_rooms_used=self.num_rooms, num_distractors=self.num_objects - 1,
                               max_steps=4 * self.num_rooms + 8)

  # -- reset ----------------------------------------------------------------------------------------------------
  def reset(self, key: Array, params: TextWorldLiteParams) -> tuple[TextWorldLiteState, Array, Array]:
    """key -> (state, obs [max_obs_len] int32, obs_len). The key and params alone fix the episode."""
    num_rooms, num_doors, num_containers, num_objects = self._counts()
    rooms_used = jnp.clip(params.num_rooms_used, 2, num_rooms).astype(jnp.int32)
    objects_used = (1 + jnp.clip(params.num_distractors, 0, num_objects - 1)).astype(jnp.int32)
    # One uniform draw feeds every choice: a single threefry call keeps the compiled reset small.
    sizes = dict(room_order=num_rooms, parent=num_doors, door=num_doors, container_room=num_containers,
                 container=num_containers, object_order=num_objects, inside=num_objects, holder=num_objects,
                 floor_room=num_objects, goal_kind=1, put_target=1, take_target=1, player_room=1)
    draws = jax.random.uniform(key, (sum(sizes.values()),))
    u, start = {}, 0
    for name, size in sizes.items():
      u[name], start = draws[start:start + size], start + size
    below = lambda uniform, count: jnp.minimum(jnp.floor(uniform * count), count - 1).astype(jnp.int32)

    # A random recursive tree: room_order[k] hangs off one of room_order[:k]; the first rooms_used are used.
    room_rank = _ranks(u["room_order"])
    room_order = _inverse_permutation(room_rank)
    later = jnp.arange(1, num_rooms)
    door_rooms = jnp.stack([room_order[1:], room_order[below(u["parent"], later)]], axis=1)
    door_active = later < rooms_used
    door_open = u["door"] >= params.door_closed_prob
    room_active = room_rank < rooms_used
    random_active_room = lambda uniform: room_order[below(uniform, rooms_used)]

    container_room = random_active_room(u["container_room"])
    container_open = u["container"] >= params.container_closed_prob

    object_rank = _ranks(u["object_order"])
    goal_object = jnp.argmin(object_rank).astype(jnp.int32)
    object_active = object_rank < objects_used
    floor_room = random_active_room(u["floor_room"])
    location = jnp.where(u["inside"] < 0.5, num_rooms + below(u["holder"], num_containers), floor_room)
    location = jnp.where(object_active, location, -1).astype(jnp.int32)

    goal_is_put = u["goal_kind"][0] < params.put_goal_prob
    put_target = below(u["put_target"][0], num_containers)
    # A put goal must not hold at the start: a goal object already in the target container moves to the floor.
    already_there = goal_is_put & (location[goal_object] == num_rooms + put_target)
    location = location.at[goal_object].set(jnp.where(already_there, floor_room[goal_object], location[goal_object]))
    # A take goal names another active room than the one the object is in (uniformly among them).
    skip = room_rank[self._room_of(location[goal_object], container_room)]
    pick = below(u["take_target"][0], rooms_used - 1)
    take_target = room_order[jnp.where(pick < skip, pick, pick + 1)]
    goal_target = jnp.where(goal_is_put, put_target, take_target).astype(jnp.int32)

    state = TextWorldLiteState(
        room_active=room_active, door_rooms=door_rooms, door_active=door_active, door_open=door_open,
        container_room=container_room, container_open=container_open, object_location=location,
        player_room=random_active_room(u["player_room"][0]), goal_is_put=goal_is_put, goal_object=goal_object,
        goal_target=goal_target, step_count=jnp.int32(0), done=jnp.bool_(False))
    obs, obs_len = self.initial_observation(state)
    return state, obs, obs_len

  # -- step -----------------------------------------------------------------------------------------------------
  def step_env(self, key: Array, state: TextWorldLiteState, action: Array, action_len: Array,
               params: TextWorldLiteParams):
    """One transition of a running episode (`Environment.step` adds the step budget and the no-op after the end):
    action [A] int32 holding action_len ids -> (state, obs [max_obs_len], obs_len, reward, terminated, StepInfo).
    Deterministic (the key is unused)."""
    del key
    num_rooms, num_doors, num_containers, num_objects = self._counts()
    index = self.command_table.match(action, action_len)
    parsed = index >= 0
    command = jnp.maximum(index, 0)
    legal = parsed & self.admissible_mask(state)[command]
    verb, arg, arg2 = self.command_verb[command], self.command_arg[command], self.command_arg2[command]

    thing = jnp.clip(arg, 0, num_objects - 1)
    moved = state.object_location.at[thing].set(jnp.where(verb == TAKE, self.carried, num_rooms + arg2))
    world = state.replace(
        player_room=jnp.where(legal & (verb == GO), arg, state.player_room),
        door_open=state.door_open | (legal & (verb == OPEN_DOOR) & (jnp.arange(num_doors) == arg)),
        container_open=(state.container_open
                        | (legal & (verb == OPEN_CONTAINER) & (jnp.arange(num_containers) == arg))),
        object_location=jnp.where(legal & ((verb == TAKE) | (verb == PUT)), moved, state.object_location),
    )
    success = self.goal_achieved(world)

    effect = self._response(world, verb, arg, arg2, parsed=parsed, legal=legal)
    show_room = legal & ((verb == GO) | (verb == LOOK))
    # The episode ends with this step when it succeeds or uses up the budget: no admissible list, no cue then.
    ended = success | self.is_last_step(state, params)
    obs, obs_len = self._assemble(world, effect, show_room=show_room, success=success, ended=ended)
    reward = jnp.where(success, SUCCESS_REWARD, jnp.where(legal, 0.0, params.invalid_penalty)).astype(jnp.float32)
    return world, obs, obs_len, reward, success, StepInfo(parsed, success)

  # -- world queries ----------------------------------------------------------------------------------------------
  def _room_of(self, location: Array, container_room: Array) -> Array:
    """Room an object location lies in (a carried or absent object gives -1 / the carried code, unused)."""
    inside = (location >= self.num_rooms) & (location < self.carried)
    return jnp.where(inside, container_room[jnp.clip(location - self.num_rooms, 0, self.num_containers - 1)],
                     location)

  def _doors_here(self, state: TextWorldLiteState, room: Array) -> tuple[Array, Array]:
    """-> (adjacent [D] bool: active doors of `room`, other side [D] int32)."""
    a, b = state.door_rooms[:, 0], state.door_rooms[:, 1]
    adjacent = state.door_active & ((a == room) | (b == room))
    return adjacent, (a + b - room).astype(jnp.int32)

  def goal_achieved(self, state: TextWorldLiteState) -> Array:
    """[] bool: the goal object is in the target container, or carried in the target room."""
    location = state.object_location[state.goal_object]
    put_done = location == self.num_rooms + state.goal_target
    take_done = (location == self.carried) & (state.player_room == state.goal_target)
    return jnp.where(state.goal_is_put, put_done, take_done)

  def admissible_mask(self, state: TextWorldLiteState) -> Array:
    """[num_commands] bool: the commands that are legal (change the world or inspect something present) now."""
    num_rooms, num_containers = self.num_rooms, self.num_containers
    here = state.player_room
    adjacent, other = self._doors_here(state, here)
    passable = adjacent & state.door_open
    go_ok = jnp.any(passable[:, None] & (other[:, None] == jnp.arange(num_rooms)[None, :]), axis=0)
    container_here = state.container_room == here
    location = state.object_location
    in_container = (location >= num_rooms) & (location < self.carried)
    holder = jnp.clip(location - num_rooms, 0, num_containers - 1)
    takeable = (location == here) | (in_container & container_here[holder] & state.container_open[holder])
    carried = location == self.carried
    put_ok = carried[:, None] & (container_here & state.container_open)[None, :]
    return jnp.concatenate([
        jnp.ones((1,), bool), go_ok, adjacent & ~state.door_open, container_here & ~state.container_open, takeable,
        put_ok.reshape(-1), adjacent, container_here, takeable | carried])

  # -- expert ---------------------------------------------------------------------------------------------------
  def _room_distances(self, state: TextWorldLiteState) -> Array:
    """[R, R] int32 hop counts over active doors (open or closed), R + 1 where unreachable (Floyd–Warshall)."""
    num_rooms = self.num_rooms
    rooms = jnp.arange(num_rooms)
    a = state.door_rooms[:, 0, None, None] == rooms[None, :, None]
    b = state.door_rooms[:, 1, None, None] == rooms[None, None, :]
    joined = jnp.any(state.door_active[:, None, None] & a & b, axis=0)
    joined = joined | joined.T
    dist = jnp.where(jnp.eye(num_rooms, dtype=bool), 0, jnp.where(joined, 1, num_rooms + 1)).astype(jnp.int32)
    for k in range(num_rooms):  # R <= 6 relaxations, unrolled
      dist = jnp.minimum(dist, dist[:, k:k + 1] + dist[k:k + 1, :])
    return dist

  def expert_command(self, state: TextWorldLiteState) -> Array:
    """Index of the scripted expert's next command: go to the goal object (opening doors), open its container,
    take it, go to the target (opening doors), open the target container, put it in."""
    num_rooms, num_containers = self.num_rooms, self.num_containers
    off = self.verb_offset
    goal = state.goal_object
    location = state.object_location[goal]
    carried = location == self.carried
    in_container = (location >= num_rooms) & (location < self.carried)
    holder = jnp.clip(location - num_rooms, 0, num_containers - 1)
    target_box = jnp.clip(state.goal_target, 0, num_containers - 1)
    destination = jnp.where(state.goal_is_put, state.container_room[target_box], state.goal_target)
    target_room = jnp.where(carried, destination, self._room_of(location, state.container_room))

    fetch = jnp.where(in_container & ~state.container_open[holder], off[OPEN_CONTAINER] + holder, off[TAKE] + goal)
    deliver = jnp.where(state.container_open[target_box], off[PUT] + goal * num_containers + target_box,
                        off[OPEN_CONTAINER] + target_box)
    act_here = jnp.where(carried, jnp.where(state.goal_is_put, deliver, off[LOOK]), fetch)

    dist = self._room_distances(state)
    adjacent, other = self._doors_here(state, state.player_room)
    on_path = adjacent & (dist[other, target_room] == dist[state.player_room, target_room] - 1)
    door = jnp.argmax(on_path)
    travel = jnp.where(state.door_open[door], off[GO] + other[door], off[OPEN_DOOR] + door)
    return jnp.where(state.player_room == target_room, act_here, travel).astype(jnp.int32)

  def expert_action(self, key: Array, state: TextWorldLiteState, params: TextWorldLiteParams) -> tuple[Array, Array]:
    """-> (tokens [max_action_len] int32, length): the expert command + end-of-step; in the think format preceded by
    "<think>fetch the apple</think>" / "<think>put the apple in the box</think>" / "<think>take the apple to the
    study</think>"."""
    del key, params
    command, eos = self.expert_command(state), self.tokenizer.end_of_step_id
    if self.step_format != "think":
      return self.command_table.encode(command, self.max_action_len, eos)
    num_rooms, _, num_containers, num_objects = self._counts()
    goal, target = state.goal_object, state.goal_target
    carried = state.object_location[goal] == self.carried
    plan = jnp.where(~carried, goal, jnp.where(state.goal_is_put, num_objects + goal * num_containers + target,
                                               num_objects * (1 + num_containers) + goal * num_rooms + target))
    plan = jnp.clip(plan, 0, self.think_ids.shape[0] - 1)
    return self.command_table.encode(command, self.max_action_len, eos,
                                     prefix=(self.think_ids[plan], self.think_lengths[plan]))

  # -- host side ------------------------------------------------------------------------------------------------
  def render(self, state: TextWorldLiteState) -> str:
    """A human-readable view of one concrete, unbatched state."""
    s = jax.tree.map(host_array, state)
    rooms, boxes, things = self.room_names, self.container_names, self.object_names
    goal_object = things[int(s.goal_object)]
    if bool(s.goal_is_put):
      goal = f"put the {goal_object} in the {boxes[int(s.goal_target)]}"
    else:
      goal = f"take the {goal_object} to the {rooms[int(s.goal_target)]}"
    lines = [f"Goal: {goal}.",
             f"Player in the {rooms[int(s.player_room)]} (step {int(s.step_count)}, done={bool(s.done)}).",
             "Rooms: " + ", ".join(rooms[r] for r in range(self.num_rooms) if s.room_active[r]) + "."]
    doors = [f"{self.door_names[d]}: {rooms[s.door_rooms[d, 0]]} - {rooms[s.door_rooms[d, 1]]} "
             f"({'open' if s.door_open[d] else 'closed'})" for d in range(self.num_doors) if s.door_active[d]]
    lines.append("Doors: " + "; ".join(doors) + ".")
    lines.append("Containers: " + "; ".join(
        f"{boxes[c]} in the {rooms[s.container_room[c]]} ({'open' if s.container_open[c] else 'closed'})"
        for c in range(self.num_containers)) + ".")

    def where(location: int) -> str:
      if location < self.num_rooms:
        return f"on the floor of the {rooms[location]}"
      if location < self.carried:
        return f"in the {boxes[location - self.num_rooms]}"
      return "carried"

    objects = [f"{things[o]} {where(int(s.object_location[o]))}" for o in range(self.num_objects)
               if s.object_location[o] >= 0]
    lines.append("Objects: " + "; ".join(objects) + ".")
    return "\n".join(lines)

  def command_index(self, text: str) -> int:
    """Host side: the table index of a command's text (KeyError when the table has no such command)."""
    if text not in self.commands:
      raise KeyError(f"{text!r} is not a command of {self.name}")
    return self.commands.index(text)
