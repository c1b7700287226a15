"""grid_nav: generated grids are well formed and always solvable (the BFS expert succeeds everywhere), random
policies rarely succeed, episodes are fixed by their key, observations read as documented and always fit, walls,
the locked goal, the key and holes behave, invalid actions and finished episodes are harmless, random token actions
never break anything, the think step format.

Compile budget (2 shared CPU cores): one jitted, vmapped rollout per step format with the policy as data, and one
jitted single step; every test reuses them with the same shapes and dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepjax.envs.base import Environment
from stepjax.envs.grid_nav import DIRECTIONS, INVALID_TEXT, GridNav, GridNavParams
from stepjax.tokenizers import ByteTokenizer

from helpers import make_env_runner

NUM_EPISODES, NUM_STEPS = 128, 34  # Two steps past the default max_steps (32), to see the no-op steps.
EXPERT, RANDOM_COMMAND, RANDOM_TOKENS, GIVEN = range(4)

TOKENIZER = ByteTokenizer()
THINK_TOKENIZER = ByteTokenizer(extra_special_tokens=("<think>", "</think>"))
ENV = GridNav(TOKENIZER)
THINK_ENV = GridNav(THINK_TOKENIZER, step_format="think")
A = ENV.max_action_len
DELTAS = {"north": (0, -1), "south": (0, 1), "east": (1, 0), "west": (-1, 0)}


ROLLOUT = make_env_runner(ENV, NUM_STEPS)
THINK_ROLLOUT = make_env_runner(THINK_ENV, NUM_STEPS)
STEP = jax.jit(ENV.step)
KEYS = jax.random.split(jax.random.PRNGKey(0), NUM_EPISODES)


def params(**overrides) -> GridNavParams:
  return ENV.default_params().replace(**overrides)


# (size, use_key, hole_prob): the smallest grid, the defaults, the largest with many holes.
CONFIGS = [(3, False, 0.5), (5, False, 0.3), (6, True, 0.2), (7, True, 0.4)]


@functools.cache
def run_of(mode: int, size: int = 6, use_key: bool = True, hole_prob: float = 0.2):
  return ROLLOUT(KEYS, params(size=size, use_key=use_key, hole_prob=hole_prob), mode)


def episode(run, b: int):
  """Row b of a rollout's arrays."""
  return jax.tree_util.tree_map(lambda x: x[b], run)


def decode(tokens, length, tokenizer=TOKENIZER) -> str:
  return tokenizer.decode(np.asarray(tokens)[:int(length)])


def action_of(text: str, tokenizer=TOKENIZER, length: int = A) -> tuple[jax.Array, jax.Array]:
  """`text` + end of step as an [length] action."""
  ids = tokenizer.encode(text) + [tokenizer.end_of_step_id]
  return jnp.asarray(ids + [0] * (length - len(ids)), jnp.int32), jnp.int32(len(ids))


def kind_at(state, x: int, y: int) -> str:
  """The word an observation uses for cell (x, y), computed on the host."""
  size = int(state.size)
  if not (0 <= x < size and 0 <= y < size):
    return "wall"
  if state.holes[y, x]:
    return "hole"
  if (x, y) == tuple(np.asarray(state.goal)):
    return "goal"
  if state.needs_key and not state.has_key and (x, y) == tuple(np.asarray(state.key_position)):
    return "key"
  return "ice"


def local_text(state) -> str:
  x, y = (int(v) for v in state.position)
  around = ", ".join(f"{d} {kind_at(state, x + dx, y + dy)}" for d, (dx, dy) in DELTAS.items())
  return f"At ({x},{y}): {around}.\n> "


def test_is_an_environment_with_documented_sizes():
  assert isinstance(ENV, Environment)
  assert ENV.max_obs_len == max(ENV.max_obs_lens.values()) == ENV.max_obs_lens["initial"] <= 160
  assert ENV.max_obs_lens["initial_without_key"] <= 135 and ENV.max_obs_lens["move"] <= 100
  assert (ENV.max_action_len, THINK_ENV.max_action_len) == (24, 64)
  assert ENV.commands.commands == list(DIRECTIONS)


@pytest.mark.parametrize("size,use_key,hole_prob", CONFIGS)
def test_grids_are_well_formed(size, use_key, hole_prob):
  states = run_of(EXPERT, size, use_key, hole_prob)["initial_state"]
  assert (states.size == size).all() and (states.needs_key == use_key).all() and not states.has_key.any()
  for b in range(NUM_EPISODES):
    s = episode(states, b)
    start, goal, key = (tuple(int(v) for v in cell) for cell in (s.position, s.goal, s.key_position))
    assert all(0 <= v < size for v in start + goal + key)
    assert not s.holes[size:].any() and not s.holes[:, size:].any()  # Holes only inside the grid.
    assert not any(s.holes[y, x] for x, y in (start, goal, key))
    assert start != goal and (key != start and key != goal if use_key else key == start)
    if size > 3:  # The goal is drawn far from the start whenever a far cell is free.
      assert abs(start[0] - goal[0]) + abs(start[1] - goal[1]) >= size - 1
  hole_fraction = states.holes.sum() / (NUM_EPISODES * size * size)
  assert 0.2 * hole_prob < hole_fraction < hole_prob


@pytest.mark.parametrize("size,use_key,hole_prob", CONFIGS)
def test_expert_solves_every_grid_along_a_short_path(size, use_key, hole_prob):
  run = run_of(EXPERT, size, use_key, hole_prob)
  assert run["success"].any(axis=1).mean() == 1.0
  np.testing.assert_allclose(run["reward"].sum(axis=1), 1.0)
  final = run["final_state"]
  assert final.success.all() and not final.fell.any() and (final.has_key == use_key).all()
  assert not run["truncated"].any() and run["parsed"][np.arange(NUM_STEPS) < final.step_count[:, None]].all()
  # The carved corridors bound the shortest path: at most 2 (size - 1) per leg.
  assert final.step_count.max() <= (4 if use_key else 2) * (size - 1)
  start, goal = run["initial_state"].position, run["initial_state"].goal
  assert (final.step_count >= np.abs(start - goal).sum(axis=1)).all()


def test_random_policies_rarely_succeed():
  commands = run_of(RANDOM_COMMAND)
  command_success = commands["success"].any(axis=1).mean()
  assert command_success <= 0.1, command_success  # Measured about 0.02 at the defaults.
  assert commands["final_state"].fell.mean() > 0.5
  tokens = run_of(RANDOM_TOKENS)
  assert tokens["success"].sum() == 0 and tokens["parsed"].sum() == 0
  assert tokens["truncated"][:, ENV.default_params().max_steps - 1].all()
  np.testing.assert_array_equal(tokens["final_state"].position, tokens["initial_state"].position)


def test_same_key_same_episode_different_keys_differ():
  first, again = run_of(RANDOM_COMMAND), ROLLOUT(KEYS, params(), RANDOM_COMMAND)
  for name in ("initial_obs", "initial_len", "obs", "obs_len", "reward"):
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  np.testing.assert_array_equal(first["initial_state"].holes, again["initial_state"].holes)
  distinct_grids = {bytes(np.asarray(h)) + bytes(np.asarray(g)) for h, g in
                    zip(first["initial_state"].holes, first["initial_state"].goal)}
  assert len(distinct_grids) == NUM_EPISODES
  assert len({bytes(np.asarray(row)) for row in first["initial_obs"]}) >= 0.9 * NUM_EPISODES


@pytest.mark.parametrize("mode", [EXPERT, RANDOM_COMMAND, RANDOM_TOKENS])
def test_observations_fit_and_are_zero_padded(mode):
  run = run_of(mode, 7, True, 0.4)
  for obs, obs_len in ((run["initial_obs"], run["initial_len"]), (run["obs"], run["obs_len"])):
    assert obs.shape[-1] == ENV.max_obs_len and obs.dtype == np.int32
    assert ((0 <= obs_len) & (obs_len <= ENV.max_obs_len)).all()
    positions = np.arange(ENV.max_obs_len)
    assert (obs[positions >= obs_len[..., None]] == 0).all()
    assert (obs[positions < obs_len[..., None]] >= 3).all() and (obs < TOKENIZER.vocab_size).all()  # No specials.
  assert (run["obs_len"] <= ENV.max_obs_lens["move"]).all()


@pytest.mark.parametrize("use_key", [False, True])
def test_initial_observation_states_task_commands_and_surroundings(use_key):
  run = run_of(EXPERT, 6, use_key, 0.2)
  for b in range(8):
    s = episode(run["initial_state"], b)
    (gx, gy), (kx, ky) = s.goal, s.key_position
    expected = f"Goal ({gx},{gy}), avoid holes. Moves: north, south, east, west; y grows south.\n"
    expected += f"Get the key at ({kx},{ky}) first.\n" if use_key else ""
    assert decode(run["initial_obs"][b], run["initial_len"][b]) == expected + local_text(s)


def hand_made_state(**changes):
  """A 5 x 5 grid: agent at (1,1), a hole east of it at (2,1), the key south at (1,2), the goal at (4,3)."""
  template = episode(run_of(EXPERT), 0)["initial_state"]
  holes = np.zeros_like(template.holes)
  holes[1, 2] = True
  state = template.replace(holes=holes, size=np.int32(5), position=np.asarray([1, 1], np.int32),
                           goal=np.asarray([4, 3], np.int32), key_position=np.asarray([1, 2], np.int32),
                           needs_key=np.bool_(True), has_key=np.bool_(False), step_count=np.int32(3))
  return state.replace(**{name: np.asarray(value, getattr(state, name).dtype) for name, value in changes.items()})


def step_text(state, text, **overrides):
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(1), state, *action_of(text), params(**overrides))
  return next_state, decode(obs, obs_len), float(reward), bool(terminated), bool(truncated), info


def test_moves_walls_key_locked_goal_and_holes_read_as_written():
  state = hand_made_state()
  assert local_text(state) == "At (1,1): north ice, south key, east hole, west ice.\n> "

  moved, text, reward, terminated, truncated, info = step_text(state, "north")
  assert text == "At (1,0): north wall, south ice, east ice, west ice.\n> "
  assert (reward, terminated, truncated, bool(info.parsed)) == (0.0, False, False, True)
  assert tuple(moved.position) == (1, 0) and moved.step_count == 4

  blocked, text, *_ = step_text(moved, "north")
  assert text == "Blocked by a wall. At (1,0): north wall, south ice, east ice, west ice.\n> "
  assert tuple(blocked.position) == (1, 0)

  with_key, text, reward, terminated, *_ = step_text(state, "south")
  assert text == "You took the key. At (1,2): north ice, south ice, east ice, west ice.\n> "
  assert with_key.has_key and (reward, terminated) == (0.0, False)

  fell, text, reward, terminated, truncated, info = step_text(state, "east")
  assert text == "You fell into a hole.\n" and (reward, terminated, truncated) == (0.0, True, False)
  assert fell.fell and fell.done and not info.success

  next_to_goal = hand_made_state(position=[3, 3])
  locked, text, reward, terminated, *_ = step_text(next_to_goal, "east")
  assert text == "Locked: get the key first. At (3,3): north ice, south ice, east goal, west ice.\n> "
  assert tuple(locked.position) == (3, 3) and (reward, terminated) == (0.0, False)
  reached, text, reward, terminated, truncated, info = step_text(next_to_goal.replace(has_key=np.bool_(True)), "east")
  assert text == "You reached the goal!\n" and (reward, terminated, bool(info.success)) == (1.0, True, True)
  assert reached.success and reached.done and tuple(reached.position) == (4, 3)

  _, _, _, terminated, truncated, _ = step_text(state, "north", max_steps=4)
  assert (terminated, truncated) == (False, True)


@pytest.mark.parametrize("text", ["", "north.", "North", "go north", "n", "north east", "northnorth", "pickup",
                                  "<|end_of_step|>north"])
def test_invalid_actions_give_fixed_feedback_and_penalty_and_change_nothing_else(text):
  state = hand_made_state()
  next_state, obs_text, reward, terminated, truncated, info = step_text(state, text, invalid_penalty=-0.1)
  assert obs_text == INVALID_TEXT == "Invalid action. Moves: north, south, east, west.\n> "
  assert reward == pytest.approx(-0.1) and not (terminated or truncated or info.parsed or info.success)
  jax.tree_util.tree_map(np.testing.assert_array_equal, next_state, state.replace(step_count=np.int32(4)))


def test_garbage_tokens_and_trailing_stop_tokens():
  state = hand_made_state()
  garbage = jnp.asarray(np.random.default_rng(0).integers(0, TOKENIZER.vocab_size, A), jnp.int32)
  _, obs, obs_len, reward, *_ = STEP(jax.random.PRNGKey(2), state, garbage, jnp.int32(A), params(invalid_penalty=-1.0))
  assert decode(obs, obs_len) == INVALID_TEXT and reward == np.float32(-1.0)
  next_state, text, _, _, _, info = step_text(state, "west<|end_of_episode|>")
  assert info.parsed and tuple(next_state.position) == (0, 1) and text.startswith("At (0,1)")


def test_stepping_a_finished_episode_is_a_no_op():
  state = episode(run_of(EXPERT), 5)["final_state"]
  assert state.done
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(3), state, *action_of("north"), params(invalid_penalty=-0.1))
  assert obs_len == 0 and not obs.any() and reward == 0.0
  assert not (terminated or truncated or info.parsed or info.success)
  jax.tree_util.tree_map(np.testing.assert_array_equal, next_state, state)
  run = run_of(EXPERT)
  after_end = np.arange(NUM_STEPS) >= run["final_state"].step_count[:, None]
  assert (run["obs_len"][after_end] == 0).all() and (run["reward"][after_end] == 0).all()


@functools.cache
def fuzz_states():
  """A fresh episode, one the expert finished, one a random policy left (mostly finished), the hand-made one."""
  return (episode(run_of(EXPERT), 7)["initial_state"], episode(run_of(EXPERT), 7)["final_state"],
          episode(run_of(RANDOM_COMMAND), 9)["final_state"], hand_made_state())


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(st.integers(0, TOKENIZER.vocab_size - 1), min_size=A, max_size=A),
       length=st.integers(0, A), command=st.integers(-1, len(DIRECTIONS) - 1), which=st.integers(0, 3))
def test_random_token_actions_never_break_anything(tokens, length, command, which):
  action = jnp.asarray(tokens, jnp.int32)
  if command >= 0:  # A real move and end of step, random tokens after them, cut at a random length.
    command_tokens, _ = action_of(DIRECTIONS[command])
    action = jnp.where(command_tokens > 0, command_tokens, action)
  state = fuzz_states()[which]
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(4), state, action, jnp.int32(length), params(invalid_penalty=-0.1))
  obs = np.asarray(obs)
  assert obs.shape == (ENV.max_obs_len,) and 0 <= obs_len <= ENV.max_obs_len
  assert (obs[obs_len:] == 0).all() and ((obs >= 0) & (obs < TOKENIZER.vocab_size)).all()
  assert float(reward) in (0.0, 1.0, np.float32(-0.1)) and reward.dtype == np.float32
  assert not (terminated and truncated) and (info.success <= terminated)
  assert bool(next_state.done) == bool(state.done or terminated or truncated)
  assert 0 <= next_state.step_count - state.step_count <= 1
  assert np.abs(np.asarray(next_state.position) - np.asarray(state.position)).sum() <= 1
  assert ((0 <= next_state.position) & (next_state.position < next_state.size)).all()
  assert (next_state.holes == state.holes).all() and next_state.has_key >= state.has_key
  if not info.parsed:
    assert state.done or decode(obs, obs_len) == INVALID_TEXT


def test_think_format_expert_succeeds_and_plain_commands_are_invalid():
  run = THINK_ROLLOUT(KEYS, params(), EXPERT)
  assert run["success"].any(axis=1).all()
  first_action = decode(run["action"][0, 0], run["action_len"][0, 0], THINK_TOKENIZER)
  assert first_action.startswith("<think>Go to the key.</think>") and first_action.endswith("<|end_of_step|>")
  last = int(run["final_state"].step_count[0]) - 1
  last_action = decode(run["action"][0, last], run["action_len"][0, last], THINK_TOKENIZER)
  assert last_action.startswith("<think>Go to the goal.</think>")

  plain_action, plain_len = action_of("east", THINK_TOKENIZER, THINK_ENV.max_action_len)
  think_action, think_len = action_of("<think>hm</think>east", THINK_TOKENIZER, THINK_ENV.max_action_len)
  given_actions = jnp.stack([plain_action, think_action] * (NUM_STEPS // 2))[None].repeat(NUM_EPISODES, axis=0)
  given_lens = jnp.stack([plain_len, think_len] * (NUM_STEPS // 2))[None].repeat(NUM_EPISODES, axis=0)
  given = THINK_ROLLOUT(KEYS, params(hole_prob=0.0), GIVEN, given_actions, given_lens)
  assert not given["parsed"][:, 0].any() and given["parsed"][:, 1].all()
  assert decode(given["obs"][0, 0], given["obs_len"][0, 0], THINK_TOKENIZER) == INVALID_TEXT


def test_render_shows_map_position_goal_and_status():
  text = ENV.render(hand_made_state())
  assert "at (1,1), goal (4,3), key (1,2) not taken" in text and "running" in text
  assert text.splitlines()[1:] == [". . . . .", ". @ O . .", ". K . . .", ". . . . G", ". . . . ."]
  final = episode(run_of(EXPERT), 0)["final_state"]
  assert "reached the goal" in ENV.render(final) and "taken" in ENV.render(final)


def test_constructor_validates_settings():
  with pytest.raises(ValueError, match="max_obs_len"):
    GridNav(TOKENIZER, max_obs_len=ENV.max_obs_len - 1)
  with pytest.raises(ValueError, match="step_format"):
    GridNav(TOKENIZER, step_format="json")
  with pytest.raises(ValueError, match="think"):
    GridNav(TOKENIZER, step_format="think")
  with pytest.raises(ValueError, match="max_size"):
    GridNav(TOKENIZER, max_size=11)
  with pytest.raises(ValueError, match="max_action_len"):
    GridNav(THINK_TOKENIZER, step_format="think", max_action_len=16)
