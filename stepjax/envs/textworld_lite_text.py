"""The observation text of TextWorldLite: the fixed texts, the effect templates and the pure-JAX functions that
compose an observation (a vector of fragment indices, -1 = nothing) from a world state, plus its worst-case length.

Split out of `textworld_lite` (the world: layout, transitions, expert) as the mixin `TextWorldLiteText`, which reads
the environment's static settings and two of its world queries (`_doors_here`, `admissible_mask`); see its docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from stepjax.envs.base import Fragments
from stepjax.tokenizers import Tokenizer

if TYPE_CHECKING:
  from stepjax.envs.textworld_lite import TextWorldLiteState

Array = Any

# Verbs of the command table; every command is (verb, argument, second argument).
LOOK, GO, OPEN_DOOR, OPEN_CONTAINER, TAKE, PUT, EXAMINE_DOOR, EXAMINE_CONTAINER, EXAMINE_OBJECT = range(9)
NUM_VERBS = 9

# Slots of the effect templates (fragment index -1 means nothing, so slots count down from -2).
SLOT_DOOR, SLOT_CONTAINER, SLOT_OBJECT, SLOT_CONTAINER2, SLOT_DOOR_CLOSED, SLOT_OTHER_ROOM, SLOT_WHERE, SLOT_HOLDER = (
    range(-2, -10, -1))
NUM_SLOTS = 8

TEXT = dict(
    you_are_in="You are in the ",
    dot_nl=".\n",
    nl="\n",
    exits="Exits: ",
    sep=", ",
    closed_tag=" (closed)",
    to_the=" to the ",
    you_see="You see: ",
    the="The ",
    holds=" holds: ",
    is_closed=" is closed.\n",
    is_empty=" is empty.\n",
    you_carry="You carry: ",
    you_open_the="You open the ",
    you_take_the="You take the ",
    you_put_the="You put the ",
    in_the=" in the ",
    leads_to_the=" leads to the ",
    is_on_floor=" is on the floor",
    is_carried=" is in your hands",
    is_in_the=" is in the ",
    unknown="Unknown command.\n",
    illegal="You can't do that now.\n",
    goal_done="Goal complete!\n",
    goal_put="Goal: put the ",
    goal_take="Goal: take the ",
    syntax="Commands: look, go <room>, open <x>, take <x>, put <x> in <y>, examine <x>.\n",
    think_syntax="Reply as <think>...</think> then one command.\n",
    admissible="Admissible: ",
    cue="> ",
)


def _seq(*parts) -> Array:
  """Concatenate scalars and 1-D arrays of fragment indices into one [n] int32 array."""
  return jnp.concatenate([jnp.atleast_1d(jnp.asarray(p, jnp.int32)).reshape(-1) for p in parts])


def _pad_to(indices: Array, width: int) -> Array:
  return jnp.pad(indices, (0, width - indices.shape[0]), constant_values=-1)


class TextWorldLiteText:
  """Mixin of `TextWorldLite`: its fragments (tokenised once) and the observations composed from them.

  Needs from the environment: `num_rooms`, `num_doors`, `num_containers`, `num_objects`, `carried`, `_counts()`,
  the name lists (`room_names`, `door_names`, `container_names`, `object_names`), the command table (`commands`,
  `num_commands`, `command_verb`), `step_format`, `list_admissible`, and the world queries `_doors_here` and
  `admissible_mask`. `_init_text` builds `fragments`, `text_id` (TEXT key -> fragment index), the per-name fragment
  indices `room_frag`, `door_frag`, `container_frag`, `object_frag`, `command_frag` and `effect_templates`.
  """

  def _init_text(self, tokenizer: Tokenizer) -> None:
    """Tokenises every fragment once (after the names and the command table are set)."""
    room_names, door_names = self.room_names, self.door_names
    container_names, object_names = self.container_names, self.object_names
    # Fragments: the fixed texts, every name and every command (for the admissible list); deduplicated.
    texts: list[str] = []
    for text in [*TEXT.values(), *room_names, *door_names, *container_names, *object_names, *self.commands]:
      if text not in texts:
        texts.append(text)
    self.fragments = Fragments(tokenizer, texts)
    self.text_id = {key: self.fragments[text] for key, text in TEXT.items()}  # TEXT key -> fragment index
    self.room_frag = jnp.asarray([self.fragments[t] for t in room_names], jnp.int32)
    self.door_frag = jnp.asarray([self.fragments[t] for t in door_names], jnp.int32)
    self.container_frag = jnp.asarray([self.fragments[t] for t in container_names], jnp.int32)
    self.object_frag = jnp.asarray([self.fragments[t] for t in object_names], jnp.int32)
    self.command_frag = jnp.asarray([self.fragments[t] for t in self.commands], jnp.int32)
    f = self.text_id
    templates = {
        OPEN_DOOR: [f["you_open_the"], SLOT_DOOR, f["dot_nl"]],
        OPEN_CONTAINER: [f["you_open_the"], SLOT_CONTAINER, f["dot_nl"]],  # + the container's status
        TAKE: [f["you_take_the"], SLOT_OBJECT, f["dot_nl"]],
        PUT: [f["you_put_the"], SLOT_OBJECT, f["in_the"], SLOT_CONTAINER2, f["dot_nl"]],
        EXAMINE_DOOR: [f["the"], SLOT_DOOR, SLOT_DOOR_CLOSED, f["leads_to_the"], SLOT_OTHER_ROOM, f["dot_nl"]],
        EXAMINE_OBJECT: [f["the"], SLOT_OBJECT, SLOT_WHERE, SLOT_HOLDER, f["dot_nl"]],
    }
    width = max(len(t) for t in templates.values())
    self.effect_templates = jnp.asarray([templates.get(v, []) + [-1] * (width - len(templates.get(v, [])))
                                         for v in range(NUM_VERBS)], jnp.int32)

  def initial_observation(self, state: TextWorldLiteState) -> tuple[Array, Array]:
    """The observation `reset` returns for `state`: goal, command syntax, room description (and admissible list)."""
    f = self.text_id
    goal_put = _seq(f["goal_put"], self.object_frag[state.goal_object], f["in_the"],
                    self.container_frag[jnp.clip(state.goal_target, 0, self.num_containers - 1)], f["dot_nl"])
    goal_take = _seq(f["goal_take"], self.object_frag[state.goal_object], f["to_the"],
                     self.room_frag[jnp.clip(state.goal_target, 0, self.num_rooms - 1)], f["dot_nl"])
    syntax = [f["syntax"], f["think_syntax"]] if self.step_format == "think" else [f["syntax"]]
    header = _seq(jnp.where(state.goal_is_put, goal_put, goal_take), *syntax)
    return self._assemble(state, header, show_room=True, success=jnp.bool_(False), ended=jnp.bool_(False))

  # -- observation pieces (fragment index arrays, -1 = nothing) ---------------------------------------------------
  def _list(self, present: Array, items: Array) -> Array:
    """present [n] bool, items [n, k] fragment indices -> [n * (k + 1)]: the present items joined by ", "."""
    first = present & (jnp.cumsum(present) == 1)
    sep = jnp.where(present & ~first, self.text_id["sep"], -1)
    items = jnp.where(present[:, None], items, -1)
    return jnp.concatenate([sep[:, None], items], axis=1).reshape(-1)

  def _line(self, show: Array, head: int, body: Array) -> Array:
    """`head` + body + ".\n" when `show`, else nothing."""
    return jnp.where(show, _seq(head, body, self.text_id["dot_nl"]), -1)

  def _container_status(self, state: TextWorldLiteState, container: Array) -> Array:
    """A container's status line -> [4 + 2 * O]: "The box is closed." / "... is empty." / "... holds: key, pen."."""
    f = self.text_id
    contents = state.object_location == self.num_rooms + container
    is_open, nonempty = state.container_open[container], jnp.any(contents)
    status = jnp.where(~is_open, f["is_closed"], jnp.where(nonempty, f["holds"], f["is_empty"]))
    listed = is_open & nonempty
    items = jnp.where(listed, self._list(contents, self.object_frag[:, None]), -1)
    return _seq(f["the"], self.container_frag[container], status, items, jnp.where(listed, f["dot_nl"], -1))

  def _describe_room(self, state: TextWorldLiteState) -> Array:
    """Where the player is, the exits, what is visible (containers' contents when open) and what is carried."""
    f, here = self.text_id, state.player_room
    adjacent, other = self._doors_here(state, here)
    closed_tag = lambda is_open: jnp.where(is_open, -1, f["closed_tag"])
    door_items = jnp.stack([self.door_frag, closed_tag(state.door_open), jnp.full_like(self.door_frag, f["to_the"]),
                            self.room_frag[other]], axis=1)
    container_here = state.container_room == here
    container_items = jnp.stack([self.container_frag, closed_tag(state.container_open)], axis=1)
    on_floor = state.object_location == here
    object_items = jnp.stack([self.object_frag, jnp.full_like(self.object_frag, -1)], axis=1)
    visible = jnp.concatenate([container_here, on_floor])
    contents = jax.vmap(lambda c: self._container_status(state, c))(jnp.arange(self.num_containers))
    has_contents = jnp.any(state.object_location[None, :] == self.num_rooms + jnp.arange(self.num_containers)[:, None],
                           axis=1)
    show_contents = container_here & state.container_open & has_contents
    carried = state.object_location == self.carried
    return _seq(
        f["you_are_in"], self.room_frag[here], f["dot_nl"],
        self._line(jnp.any(adjacent), f["exits"], self._list(adjacent, door_items)),
        self._line(jnp.any(visible), f["you_see"],
                   self._list(visible, jnp.concatenate([container_items, object_items]))),
        jnp.where(show_contents[:, None], contents, -1),
        self._line(jnp.any(carried), f["you_carry"], self._list(carried, self.object_frag[:, None])))

  def _effect(self, state: TextWorldLiteState, verb: Array, arg: Array, arg2: Array) -> Array:
    """What a legal command did, read from the world after it -> [W]: the verb's template with its slots filled,
    then the container's status for "open"/"examine" of a container. Going and looking say nothing here: the room
    description follows."""
    f = self.text_id
    door = jnp.clip(arg, 0, self.num_doors - 1)
    container = jnp.clip(arg, 0, self.num_containers - 1)
    thing = jnp.clip(arg, 0, self.num_objects - 1)
    _, other = self._doors_here(state, state.player_room)
    location = state.object_location[thing]
    in_container = (location >= self.num_rooms) & (location < self.carried)
    where_is = jnp.where(in_container, f["is_in_the"], jnp.where(location == self.carried, f["is_carried"],
                                                                 f["is_on_floor"]))
    holder = self.container_frag[jnp.clip(location - self.num_rooms, 0, self.num_containers - 1)]
    slot_values = _seq(self.door_frag[door], self.container_frag[container], self.object_frag[thing],
                       self.container_frag[jnp.clip(arg2, 0, self.num_containers - 1)],
                       jnp.where(state.door_open[door], -1, f["closed_tag"]), self.room_frag[other[door]], where_is,
                       jnp.where(in_container, holder, -1))
    template = self.effect_templates[verb]
    filled = jnp.where(template <= SLOT_DOOR, slot_values[jnp.clip(SLOT_DOOR - template, 0, NUM_SLOTS - 1)],
                       template)
    shows_status = (verb == OPEN_CONTAINER) | (verb == EXAMINE_CONTAINER)
    return _seq(filled, jnp.where(shows_status, self._container_status(state, container), -1))

  def _response(self, state: TextWorldLiteState, verb: Array, arg: Array, arg2: Array, *, parsed: Array,
                legal: Array) -> Array:
    """What a step says first -> [W]: the effect of a legal command (`_effect`, read from the world after it), else
    the fixed feedback: "Unknown command." for an action that does not parse, "You can't do that now." for an
    illegal one."""
    effect = self._effect(state, verb, arg, arg2)
    feedback = _pad_to(_seq(jnp.where(parsed, self.text_id["illegal"], self.text_id["unknown"])), effect.shape[0])
    return jnp.where(legal, effect, feedback)

  def _assemble(self, state: TextWorldLiteState, head: Array, *, show_room: Array, success: Array,
                ended: Array) -> tuple[Array, Array]:
    """head + room description (if show_room) + "Goal complete!" (if success) + admissible list and cue (while the
    episode runs) -> (obs [max_obs_len] int32, obs_len)."""
    f = self.text_id
    parts = [head, jnp.where(show_room, self._describe_room(state), -1), jnp.where(success, f["goal_done"], -1)]
    if self.list_admissible:
      listing = _seq(f["admissible"], self._list(self.admissible_mask(state), self.command_frag[:, None]), f["nl"])
      parts.append(jnp.where(ended, -1, listing))
    parts.append(jnp.where(ended, -1, f["cue"]))
    return self.fragments.compose(_seq(*parts), self.max_obs_len)

  # -- sizing (host side) ---------------------------------------------------------------------------------------
  def _worst_observation_len(self) -> int:
    """An upper bound on every observation's length, from worst-case fragment compositions (`max_len_of`)."""
    fr, f = self.fragments, self.text_id
    num_rooms, num_doors, num_containers, num_objects = self._counts()
    lengths = fr.host_lengths

    def longest(indices) -> int:
      indices = [int(i) for i in np.asarray(indices).reshape(-1)]
      return max(indices, key=lambda i: lengths[i])

    room, door = longest(self.room_frag), longest(self.door_frag)
    box, thing = longest(self.container_frag), longest(self.object_frag)
    # Every door at the player's room and closed; every container here, closed and (over-counting) listing
    # contents; every object listed once, each with a separator.
    room_description = ([f["you_are_in"], room, f["dot_nl"], f["exits"], f["dot_nl"]]
                        + [f["sep"], door, f["closed_tag"], f["to_the"], room] * num_doors
                        + [f["you_see"], f["dot_nl"], f["you_carry"], f["dot_nl"]]
                        + [f["sep"], box, f["closed_tag"], f["the"], box, f["holds"], f["dot_nl"]] * num_containers
                        + [f["sep"], thing] * num_objects)
    status = [f["the"], box, max([f["is_closed"], f["is_empty"], f["holds"]], key=lambda i: lengths[i]),
              f["dot_nl"]] + [f["sep"], thing] * num_objects
    effects = [
        [f["you_open_the"], longest([door, box]), f["dot_nl"]] + status,
        [f["you_take_the"], thing, f["dot_nl"]],
        [f["you_put_the"], thing, f["in_the"], box, f["dot_nl"]],
        [f["the"], door, f["closed_tag"], f["leads_to_the"], room, f["dot_nl"]],
        [f["the"], thing, longest([f["is_in_the"], f["is_carried"], f["is_on_floor"]]), box, f["dot_nl"]],
        [f["unknown"]], [f["illegal"]],
    ]
    effect = max(effects, key=fr.max_len_of)
    goal = [max([f["goal_put"], f["goal_take"]], key=lambda i: lengths[i]), thing, longest([f["in_the"], f["to_the"]]),
            longest([box, room]), f["dot_nl"], f["syntax"]]
    goal += [f["think_syntax"]] if self.step_format == "think" else []
    tail = [f["goal_done"], f["cue"]]
    if self.list_admissible:
      # Listed at most: look; per door "go" or "open" (never both) and "examine"; every container and object
      # examined; with k containers here open and m objects carried: the other C - k opened, the other O - m
      # taken, and m * k puts. Each command counted at the longest length of its kind.
      verbs = np.asarray(self.command_verb)
      longest_command = lambda *kinds: longest([self.command_frag[i] for i in range(self.num_commands)
                                                if verbs[i] in kinds])
      listed = [longest_command(LOOK)]
      listed += [longest_command(GO, OPEN_DOOR), longest_command(EXAMINE_DOOR)] * num_doors
      listed += [longest_command(EXAMINE_CONTAINER)] * num_containers + [longest_command(EXAMINE_OBJECT)] * num_objects
      mixes = [[longest_command(OPEN_CONTAINER)] * (num_containers - k) + [longest_command(TAKE)] * (num_objects - m)
               + [longest_command(PUT)] * (m * k) for k in range(num_containers + 1) for m in range(num_objects + 1)]
      listed += max(mixes, key=fr.max_len_of)
      tail += [f["admissible"], f["nl"]] + [x for i in listed for x in (f["sep"], i)]
    cases = [goal + room_description + tail, room_description + tail, effect + tail]
    return max(fr.max_len_of(case) for case in cases)
