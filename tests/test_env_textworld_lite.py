"""TextWorldLite: expert and random success, determinism, exact observations, admissible lists, invalid actions,
fuzzing. Compiles are the cost on CPU, so there are two env configurations ("plain", and "full" = list_admissible +
the think step format), one vmapped episode runner each, and one single-step jit of the plain env."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepjax.envs.base import host_array
from stepjax.envs.textworld_lite import TextWorldLite, TextWorldLiteState
from stepjax.tokenizers import ByteTokenizer

NUM_EPISODES = 64
TOKENIZER = ByteTokenizer()
THINK_TOKENIZER = ByteTokenizer(extra_special_tokens=("<think>", "</think>"))
ILLEGAL = "You can't do that now.\n"
UNKNOWN = "Unknown command.\n"


@functools.lru_cache(maxsize=None)
def make_env(kind: str) -> TextWorldLite:
  if kind == "full":
    return TextWorldLite(THINK_TOKENIZER, list_admissible=True, step_format="think")
  return TextWorldLite(TOKENIZER)


def decode(env, tokens, length) -> str:
  return env.tokenizer.decode(np.asarray(tokens)[:int(length)])


@functools.partial(jax.jit, static_argnums=(0, 4))
def run_episodes(env, params, keys, use_expert, num_steps):
  """keys [B] -> per-step records [B, num_steps, ...] of expert (use_expert) or uniform-random-command episodes."""

  specials = env.tokenizer.special_ids
  think_ids = (specials["<think>"], specials["</think>"]) if env.step_format == "think" else ()

  def episode(key):
    reset_key, command_key, run_key = jax.random.split(key, 3)
    state, obs, obs_len = env.reset(reset_key, params)
    # Random draws happen outside the scan body: a threefry inside it would double the compile time.
    random_commands = jax.random.randint(command_key, (num_steps,), 0, env.num_commands)
    step_keys = jax.random.split(run_key, num_steps)

    def body(state, inputs):
      step_key, random_command = inputs
      expert_tokens, expert_len = env.expert_action(step_key, state, params)
      random_tokens, random_len = env.command_table.encode(random_command, env.max_action_len,
                                                           env.tokenizer.end_of_step_id, think_ids)
      tokens = jnp.where(use_expert, expert_tokens, random_tokens)
      length = jnp.where(use_expert, expert_len, random_len)
      command = jnp.where(use_expert, env.expert_command(state), random_command)
      next_state, obs, obs_len, reward, terminated, truncated, info = env.step(step_key, state, tokens, length, params)
      record = dict(state=state, command=command, listed=env.admissible_mask(state), obs=obs, obs_len=obs_len,
                    reward=reward, terminated=terminated, truncated=truncated, parsed=info.parsed,
                    success=info.success, action=tokens, action_len=length)
      return next_state, record

    final_state, records = jax.lax.scan(body, state, (step_keys, random_commands))
    return dict(initial_obs=obs, initial_len=obs_len, final_state=final_state, **records)

  return jax.vmap(episode)(keys)


def run(kind: str, use_expert: bool, seed: int = 0, **param_changes):
  """64 episodes of the `kind` env from `seed` with default params updated by `param_changes`, on the host."""
  env = make_env(kind)
  params = env.default_params().replace(**param_changes)
  keys = jax.random.split(jax.random.PRNGKey(seed), NUM_EPISODES)
  # Two steps past the default limit, to see steps after done; params changes keep shapes (no recompile).
  num_steps = int(env.default_params().max_steps) + 2
  return jax.tree.map(host_array, run_episodes(env, params, keys, jnp.bool_(use_expert), num_steps))


episodes = functools.lru_cache(maxsize=None)(run)


def success_rate(records) -> float:
  return float(records["success"].any(axis=1).mean())


def check_outputs_in_range(env, records):
  obs, obs_len = records["obs"], records["obs_len"]
  assert obs_len.min() >= 0 and obs_len.max() < env.max_obs_len  # never cut
  positions = np.arange(env.max_obs_len)
  assert np.all(np.where(positions >= obs_len[..., None], obs == 0, True))  # buffer tail is 0
  assert obs.min() >= 0 and obs.max() < env.tokenizer.vocab_size
  assert np.all(records["initial_len"] < env.max_obs_len)


# -- success ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "full"])
def test_expert_solves_every_episode(kind):
  env, records = make_env(kind), episodes(kind, True)
  assert success_rate(records) == 1.0
  running = ~records["state"].done
  assert np.all(records["parsed"][running])
  assert np.all(records["reward"][running] >= 0)  # the expert never pays the penalty
  assert np.all(records["reward"].sum(axis=1) == 1.0)
  assert not records["truncated"].any()
  check_outputs_in_range(env, records)


def test_expert_on_hard_and_easy_layouts():
  hard = episodes("plain", True, 1, door_closed_prob=1.0, container_closed_prob=1.0)
  easy = episodes("plain", True, 2, num_rooms_used=2, num_distractors=0, door_closed_prob=0.0)
  assert success_rate(hard) == 1.0 and success_rate(easy) == 1.0
  assert np.all(easy["state"].room_active[:, 0].sum(axis=1) == 2)
  assert np.all((easy["state"].object_location[:, 0] >= 0).sum(axis=1) == 1)
  assert hard["state"].door_open[:, 0].sum() == 0
  assert easy["final_state"].step_count.mean() < hard["final_state"].step_count.mean()


@pytest.mark.parametrize("kind", ["plain", "full"])
def test_random_policy_rarely_succeeds(kind):
  records = episodes(kind, False)
  rate = success_rate(records)
  print(f"{kind}: uniform random command policy success {rate:.3f}")
  assert rate <= 0.2
  assert records["truncated"].sum() == NUM_EPISODES - records["success"].any(axis=1).sum()
  running = ~records["state"].done
  assert np.all(records["parsed"][running])  # random commands, but well-formed
  check_outputs_in_range(make_env(kind), records)


def test_step_limit_truncates():
  records = episodes("plain", True, 0, max_steps=3)
  assert np.all(records["truncated"][:, 2] | records["success"][:, :3].any(axis=1))
  assert not records["truncated"][:, 3:].any() and not records["success"][:, 3:].any()
  assert np.all(records["final_state"].done)


def test_stepping_after_done_is_a_no_op():
  records = episodes("plain", True)
  state = records["state"]
  done_before = state.done[:, :-1]
  assert done_before.any()
  assert np.all(records["obs_len"][:, :-1][done_before] == 0)
  assert np.all(records["reward"][:, :-1][done_before] == 0)
  assert not (records["terminated"] | records["truncated"] | records["parsed"])[:, :-1][done_before].any()
  for field in jax.tree.leaves(state):
    same = field[:, 1:] == field[:, :-1]
    assert np.all(same.reshape(same.shape[:2] + (-1,)).all(axis=-1)[done_before])


# -- determinism --------------------------------------------------------------------------------------------------
def test_same_key_same_episode_different_keys_differ():
  first, again = episodes("plain", True), run("plain", True)  # the second is computed afresh
  np.testing.assert_array_equal(first["initial_obs"], again["initial_obs"])
  np.testing.assert_array_equal(first["obs"], again["obs"])
  initial = first["initial_obs"]
  distinct = {initial[i, :first["initial_len"][i]].tobytes() for i in range(NUM_EPISODES)}
  assert len(distinct) > NUM_EPISODES // 2
  other_seed = episodes("plain", True, 5)
  assert not np.array_equal(first["initial_obs"], other_seed["initial_obs"])


# -- exact text ---------------------------------------------------------------------------------------------------
def hand_made_state() -> TextWorldLiteState:
  """hall (0) - red door (open) - kitchen (1); hall - blue door (closed) - study (2); garden unused. Box (closed)
  in the kitchen holds the apple; the open drawer in the hall holds the key; no book. Goal: apple into drawer."""
  return TextWorldLiteState(
      room_active=jnp.array([True, True, True, False]),
      door_rooms=jnp.array([[1, 0], [2, 0], [3, 2]], jnp.int32),
      door_active=jnp.array([True, True, False]), door_open=jnp.array([True, False, False]),
      container_room=jnp.array([1, 0], jnp.int32), container_open=jnp.array([False, True]),
      object_location=jnp.array([4, 5, -1], jnp.int32), player_room=jnp.int32(0), goal_is_put=jnp.bool_(True),
      goal_object=jnp.int32(0), goal_target=jnp.int32(1), step_count=jnp.int32(0), done=jnp.bool_(False))


@functools.lru_cache(maxsize=None)
def jitted_step(kind: str):
  return jax.jit(make_env(kind).step)


def act(env, state, text: str, params=None):
  """Step with `text` + end-of-step (text need not be a command), on the shared jitted step."""
  params = params or env.default_params()
  ids = env.tokenizer.encode(text) + [env.tokenizer.end_of_step_id]
  action = np.zeros(env.max_action_len, np.int32)
  action[:len(ids)] = ids[:env.max_action_len]
  return jitted_step("plain")(jax.random.PRNGKey(0), state, jnp.asarray(action),
                              jnp.int32(min(len(ids), env.max_action_len)), params)


def test_hand_checked_observations():
  env = make_env("plain")
  state = hand_made_state()
  obs, obs_len = jax.jit(env.initial_observation)(state)
  assert decode(env, obs, obs_len) == (
      "Goal: put the apple in the drawer.\n"
      "Commands: look, go <room>, open <x>, take <x>, put <x> in <y>, examine <x>.\n"
      "You are in the hall.\n"
      "Exits: red door to the kitchen, blue door (closed) to the study.\n"
      "You see: drawer.\n"
      "The drawer holds: key.\n"
      "> ")
  assert np.all(np.asarray(obs)[int(obs_len):] == 0)
  script = [
      ("take apple", ILLEGAL + "> ", -0.1),
      ("dance", UNKNOWN + "> ", -0.1),
      ("examine blue door", "The blue door (closed) leads to the study.\n> ", 0.0),
      ("examine key", "The key is in the drawer.\n> ", 0.0),
      ("go kitchen", "You are in the kitchen.\nExits: red door to the hall.\nYou see: box (closed).\n> ", 0.0),
      ("open box", "You open the box.\nThe box holds: apple.\n> ", 0.0),
      ("take apple", "You take the apple.\n> ", 0.0),
      ("examine apple", "The apple is in your hands.\n> ", 0.0),
      ("open box", ILLEGAL + "> ", -0.1),
      ("go hall", "You are in the hall.\nExits: red door to the kitchen, blue door (closed) to the study.\n"
                  "You see: drawer.\nThe drawer holds: key.\nYou carry: apple.\n> ", 0.0),
      ("put apple in drawer", "You put the apple in the drawer.\nGoal complete!\n", 1.0),
  ]
  for text, expected, expected_reward in script:
    state, obs, obs_len, reward, terminated, truncated, info = act(env, state, text)
    assert decode(env, obs, obs_len) == expected, text
    assert np.all(np.asarray(obs)[int(obs_len):] == 0)
    assert float(reward) == pytest.approx(expected_reward)
    assert bool(info.parsed) == (text != "dance")
  assert bool(terminated) and bool(info.success) and not bool(truncated) and bool(state.done)
  assert int(state.step_count) == len(script)


def test_render_names_the_goal_and_rooms():
  env = make_env("plain")
  text = env.render(hand_made_state())
  assert "put the apple in the drawer" in text
  assert all(room in text for room in ("hall", "kitchen", "study"))
  assert "garden" not in text  # unused room
  records = episodes("plain", True)
  for i in range(4):
    shown = env.render(jax.tree.map(lambda x: x[i, 0], records["state"]))
    goal_line = shown.splitlines()[0]
    assert goal_line.startswith("Goal: ")
    assert decode(env, records["initial_obs"][i], records["initial_len"][i]).startswith(goal_line + "\n")


# -- invalid actions ----------------------------------------------------------------------------------------------
def test_invalid_actions_change_nothing_but_the_step_count():
  env = make_env("plain")
  state = hand_made_state()
  for text in ("take apple", "go study", "open red door", "put key in box", "examine box", "dance", "", "look look"):
    next_state, obs, obs_len, reward, terminated, truncated, info = act(env, state, text)
    assert decode(env, obs, obs_len) == (ILLEGAL if info.parsed else UNKNOWN) + "> ", text
    assert float(reward) == pytest.approx(-0.1)
    assert not bool(terminated) and not bool(truncated)
    assert int(next_state.step_count) == 1
    for before, after in zip(jax.tree.leaves(state.replace(step_count=0)),
                             jax.tree.leaves(next_state.replace(step_count=0))):
      np.testing.assert_array_equal(before, after)
  penalty = env.default_params().replace(invalid_penalty=-0.5)
  assert float(act(env, state, "dance", penalty)[3]) == pytest.approx(-0.5)


def test_think_format():
  env = make_env("full")
  records = episodes("full", True)
  first = decode(env, records["initial_obs"][0], records["initial_len"][0])
  assert "Reply as <think>...</think> then one command.\n" in first
  action = decode(env, records["action"][0, 0], records["action_len"][0, 0])
  assert action.startswith("<think>fetch the ") and action.endswith("<|end_of_step|>")
  state = records["state"]
  goal_location = np.take_along_axis(state.object_location, state.goal_object[..., None], axis=-1)[..., 0]
  for i, t in zip(*np.nonzero((goal_location == env.carried) & ~state.done)):
    plan = "put the " if state.goal_is_put[i, t] else "take the "
    assert decode(env, records["action"][i, t], records["action_len"][i, t]).startswith("<think>" + plan)
  with pytest.raises(ValueError, match="think"):
    TextWorldLite(TOKENIZER, step_format="think")


def test_constructor_validation():
  with pytest.raises(ValueError, match="max_obs_len"):
    TextWorldLite(TOKENIZER, max_obs_len=50)
  with pytest.raises(ValueError, match="num_rooms"):
    TextWorldLite(TOKENIZER, num_rooms=9)
  with pytest.raises(ValueError, match="step_format"):
    TextWorldLite(TOKENIZER, step_format="json")


# -- admissible lists ---------------------------------------------------------------------------------------------
def test_admissible_list_is_exactly_the_legal_commands():
  env = make_env("full")
  for use_expert in (True, False):
    records = episodes("full", use_expert)
    if use_expert:
      running = ~records["state"].done
      assert np.all(records["listed"][np.arange(NUM_EPISODES)[:, None], np.arange(records["command"].shape[1]),
                                      records["command"]][running])
    check_outputs_in_range(env, records)
    for episode, step in [(0, 0), (1, 3), (2, 6), (3, 9), (5, 2)]:
      state = jax.tree.map(lambda x: x[episode, step], records["state"])
      if state.done:
        continue
      # The text of the previous observation lists exactly the mask, in table order.
      obs, obs_len = ((records["initial_obs"][episode], records["initial_len"][episode]) if step == 0 else
                      (records["obs"][episode, step - 1], records["obs_len"][episode, step - 1]))
      text = decode(env, obs, obs_len)
      assert text.endswith("\n> ")
      listed_text = text.rsplit("Admissible: ", 1)[1][:-len("\n> ")].split(", ")
      listed = records["listed"][episode, step]
      assert listed_text == [env.commands[i] for i in np.flatnonzero(listed)]
      # Executing every command: listed ones are legal, the others give the illegal feedback. (On the plain env's
      # compiled step: list_admissible changes observations only, and this saves a compile.)
      for i, command in enumerate(env.commands):
        _, obs, obs_len, reward, _, _, info = act(make_env("plain"), state, command)
        said = decode(env, obs, obs_len)
        assert bool(info.parsed) and said.startswith(ILLEGAL) != bool(listed[i]), (command, said)
        assert (float(reward) < 0) != bool(listed[i])


# -- fuzzing ------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(0, TOKENIZER.vocab_size + 3), min_size=20, max_size=20),
       length=st.integers(0, 20), episode=st.integers(0, NUM_EPISODES - 1), step=st.integers(0, 10))
def test_random_token_actions_never_break_the_env(tokens, length, episode, step):
  env = make_env("plain")
  assert env.max_action_len == 20
  state = jax.tree.map(lambda x: x[episode, step], episodes("plain", False)["state"])
  out = act_tokens(env, state, np.asarray(tokens, np.int32), length)
  next_state, obs, obs_len, reward, terminated, truncated, info = jax.tree.map(host_array, out)
  assert 0 <= obs_len < env.max_obs_len and np.all(obs[obs_len:] == 0)
  assert obs.min() >= 0 and obs.max() < env.tokenizer.vocab_size
  assert reward in (np.float32(-0.1), 0.0, 1.0) or (state.done and reward == 0.0)
  assert next_state.step_count in (state.step_count, state.step_count + 1)
  assert np.all((next_state.object_location >= -1) & (next_state.object_location <= env.carried))
  assert 0 <= next_state.player_room < env.num_rooms and next_state.room_active[next_state.player_room]
  if not info.parsed and not state.done:
    assert decode(env, obs, obs_len).startswith(UNKNOWN)


def act_tokens(env, state, tokens, length):
  return jitted_step("plain")(jax.random.PRNGKey(0), state, jnp.asarray(tokens), jnp.int32(length),
                              env.default_params())
