"""lookup_qa: the expert solves every episode, random policies rarely do, episodes are fixed by their key,
observations read as documented and always fit, invalid actions and finished episodes are harmless, random token
actions never break anything, the think step format.

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
from stepjax.envs.lookup_qa import INTRO_TEXT, INVALID_TEXT, RELATIONS, LookupQA, LookupQAParams, vocabulary
from stepjax.tokenizers import ByteTokenizer, WordTokenizer

from helpers import make_env_runner

NUM_EPISODES, NUM_STEPS = 128, 10
EXPERT, RANDOM_COMMAND, RANDOM_TOKENS, GIVEN = range(4)

TOKENIZER = ByteTokenizer()
THINK_TOKENIZER = ByteTokenizer(extra_special_tokens=("<think>", "</think>"))
ENV = LookupQA(TOKENIZER)
THINK_ENV = LookupQA(THINK_TOKENIZER, step_format="think")
FACT_ENV = LookupQA(THINK_TOKENIZER, step_format="think", think_wording="fact")
NAMES = ENV.entity_names
A = ENV.max_action_len


ROLLOUT = make_env_runner(ENV, NUM_STEPS)
THINK_ROLLOUT = make_env_runner(THINK_ENV, NUM_STEPS)
FACT_ROLLOUT = make_env_runner(FACT_ENV, 4)
STEP = jax.jit(ENV.step)
KEYS = jax.random.split(jax.random.PRNGKey(0), NUM_EPISODES)


def params(**overrides) -> LookupQAParams:
  return ENV.default_params().replace(**overrides)


@functools.cache
def expert_run(hops: int):
  return ROLLOUT(KEYS, params(hops=hops), EXPERT)


def episode(run, b: int):
  """Row b of a rollout's arrays."""
  return jax.tree_util.tree_map(lambda x: x[b], run)


def decode(tokens, length) -> str:
  return TOKENIZER.decode(np.asarray(tokens)[:int(length)])


def action_of(text: str, tokenizer=TOKENIZER, length: int = A) -> tuple[jax.Array, jax.Array]:
  """`text` + end of step as an [length] action."""
  ids = tokenizer.encode(text) + [tokenizer.end_of_step_id]
  return jnp.asarray(ids + [0] * (length - len(ids)), jnp.int32), jnp.int32(len(ids))


def test_is_an_environment_with_documented_sizes():
  assert isinstance(ENV, Environment)
  assert ENV.max_obs_len == max(ENV.max_obs_lens.values()) <= 150
  assert ENV.max_obs_lens["facts"] <= 100
  assert ENV.max_action_len == 24
  # think: the expert's longest action (4 hops of the longest names) plus 8 spare tokens, rounded up to 8.
  longest = max(len(THINK_TOKENIZER.encode(f"<think>the author of {a} is {b}; next the author of {b}</think>"
                                           f"search {b}")) for a in NAMES for b in NAMES if a != b) + 1
  assert THINK_ENV.max_action_len == -(-(longest + 8) // 8) * 8
  assert len(ENV.commands.commands) == 2 * ENV.num_entities == 64
  assert len(set(NAMES)) == len(NAMES) and all(4 <= len(name) <= 6 for name in NAMES)


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_expert_solves_every_episode_in_hops_plus_one_steps(hops):
  run = expert_run(hops)
  success = run["success"].any(axis=1)
  assert success.mean() == 1.0
  np.testing.assert_array_equal(run["terminated"].argmax(axis=1), hops)  # Terminated at step hops + 1.
  np.testing.assert_allclose(run["reward"].sum(axis=1), 1.0)
  assert not run["truncated"].any() and run["parsed"][:, :hops + 1].all()
  assert run["final_state"].done.all() and (run["final_state"].step_count == hops + 1).all()


def test_expert_reads_the_true_next_hop_and_is_truncated_without_budget():
  run = expert_run(2)
  for b in range(8):
    row = episode(run, b)
    chain, path = row["initial_state"].chain, row["initial_state"].path
    first_result = decode(row["obs"][0], row["obs_len"][0])
    assert first_result.startswith(f"{NAMES[chain[0]]}: ") and f"{RELATIONS[path[0]]} {NAMES[chain[1]]}" in first_result
  short = ROLLOUT(KEYS, params(hops=3, max_steps=3), EXPERT)
  assert not short["success"].any() and short["truncated"][:, 2].all() and not short["terminated"].any()
  assert (short["obs_len"][:, 3:] == 0).all()  # Steps after the truncation are no-ops.


def test_random_policies_rarely_succeed():
  commands = ROLLOUT(KEYS, params(), RANDOM_COMMAND)
  command_success = commands["success"].any(axis=1).mean()
  assert command_success <= 0.1, command_success  # About 1 / num_entities: it answers early, at random.
  tokens = ROLLOUT(KEYS, params(), RANDOM_TOKENS)
  assert tokens["success"].sum() == 0 and tokens["parsed"].sum() == 0
  assert tokens["truncated"][:, ENV.default_params().max_steps - 1].all()


def test_same_key_same_episode_different_keys_differ():
  first, again = ROLLOUT(KEYS, params(), RANDOM_COMMAND), ROLLOUT(KEYS, params(), RANDOM_COMMAND)
  for name in ("initial_obs", "initial_len", "obs", "obs_len", "reward"):
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  np.testing.assert_array_equal(first["initial_state"].facts, again["initial_state"].facts)
  distinct_questions = {bytes(np.asarray(row)) for row in first["initial_obs"]}
  assert len(distinct_questions) >= 0.7 * NUM_EPISODES  # 32 x 4^2 questions at 2 hops: a few repeat by chance.
  assert len({bytes(np.asarray(f)) for f in first["initial_state"].facts}) == NUM_EPISODES


@pytest.mark.parametrize("mode", [EXPERT, RANDOM_COMMAND, RANDOM_TOKENS])
def test_observations_fit_and_are_zero_padded(mode):
  run = ROLLOUT(KEYS, params(hops=4), mode)
  for obs, obs_len in ((run["initial_obs"], run["initial_len"]), (run["obs"], run["obs_len"])):
    assert obs.shape[-1] == ENV.max_obs_len and obs.dtype == np.int32
    assert ((0 <= obs_len) & (obs_len <= ENV.max_obs_len)).all()
    positions = np.arange(ENV.max_obs_len)
    assert (obs[positions >= obs_len[..., None]] == 0).all()
    assert (obs[positions < obs_len[..., None]] >= 3).all() and (obs < TOKENIZER.vocab_size).all()  # No specials.
  assert run["initial_len"].max() <= ENV.max_obs_lens["question"]


def test_initial_observation_states_task_question_and_cue():
  run = expert_run(2)
  for b in range(8):
    row = episode(run, b)
    chain, path = row["initial_state"].chain, row["initial_state"].path
    question = f"Q: what is the {RELATIONS[path[1]]} of the {RELATIONS[path[0]]} of {NAMES[chain[0]]}?"
    assert decode(row["initial_obs"], row["initial_len"]) == INTRO_TEXT + question + "\n> "
    assert ENV.question_text(row["initial_state"]) == question
  assert INTRO_TEXT == "Answer with: search <name>, answer <name>.\n"


def test_search_and_answer_observations_read_as_written():
  state = episode(expert_run(2), 0)["initial_state"]
  facts = np.asarray(state.facts).copy()
  facts[NAMES.index("Zorva")] = [NAMES.index(name) for name in ("Kalin", "Pemo", "Dorna", "Vesk")]
  chain = np.asarray(state.chain).copy()
  chain[:3] = [NAMES.index(name) for name in ("Zorva", "Kalin", "Lenta")]
  state = state.replace(facts=jnp.asarray(facts), chain=jnp.asarray(chain))
  key = jax.random.PRNGKey(1)

  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(key, state, *action_of("search Zorva"), params())
  assert decode(obs, obs_len) == "Zorva: mentor Kalin; city Pemo; rival Dorna; author Vesk.\n> "
  assert (reward, terminated, truncated, info.parsed, info.success) == (0.0, False, False, True, False)
  assert next_state.searched[NAMES.index("Zorva")] and next_state.searched.sum() == 1

  _, obs, obs_len, reward, terminated, _, info = STEP(key, state, *action_of("answer Kalin"), params())
  assert decode(obs, obs_len) == "Wrong, it was Lenta.\n"
  assert (reward, terminated, info.success) == (0.0, True, False)
  done_state, obs, obs_len, reward, terminated, _, info = STEP(key, state, *action_of("answer Lenta"), params())
  assert decode(obs, obs_len) == "Correct.\n"
  assert (reward, terminated, info.success) == (1.0, True, True)
  assert done_state.done and done_state.answered == NAMES.index("Lenta")


@pytest.mark.parametrize("text", ["", "search", "search zorva", "search Nobody", "answer  Zorva", "Search Zorva",
                                  "search Zorva please", "look", "answer Zorva\nKalin"])
def test_invalid_actions_give_fixed_feedback_and_penalty_and_change_nothing_else(text):
  state = episode(expert_run(2), 3)["initial_state"]
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(2), state, *action_of(text), params(invalid_penalty=-0.1))
  assert decode(obs, obs_len) == INVALID_TEXT
  assert INVALID_TEXT == "Invalid action. Use: search <name> or answer <name>.\n> "
  np.testing.assert_allclose(reward, -0.1)
  assert not (terminated or truncated or info.parsed or info.success)
  expected = state.replace(step_count=state.step_count + 1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, next_state, expected)


def test_garbage_tokens_and_trailing_stop_tokens():
  state = episode(expert_run(2), 3)["initial_state"]
  key = jax.random.PRNGKey(3)
  garbage = jnp.asarray(np.random.default_rng(0).integers(0, TOKENIZER.vocab_size, A), jnp.int32)
  _, obs, obs_len, reward, *_ = STEP(key, state, garbage, jnp.int32(A), params(invalid_penalty=-0.5))
  assert decode(obs, obs_len) == INVALID_TEXT and reward == np.float32(-0.5)
  # The end-of-step and end-of-episode ids close a step; they are not part of the command.
  name = NAMES[int(state.chain[0])]
  action, length = action_of(f"search {name}<|end_of_episode|>")
  _, obs, obs_len, _, _, _, info = STEP(key, state, action, length, params())
  assert info.parsed and decode(obs, obs_len).startswith(f"{name}: ")


def test_stepping_a_finished_episode_is_a_no_op():
  state = episode(expert_run(1), 5)["final_state"]
  assert state.done
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(4), state, *action_of("search Zorva"), params(invalid_penalty=-0.1))
  assert obs_len == 0 and not obs.any() and reward == 0.0
  assert not (terminated or truncated or info.parsed or info.success)
  jax.tree_util.tree_map(np.testing.assert_array_equal, next_state, state)
  run = expert_run(1)
  assert (run["obs_len"][:, 2:] == 0).all() and (run["reward"][:, 2:] == 0).all()


@functools.cache
def fuzz_states():
  """A fresh episode, one the expert finished, one a random policy left mid-way or finished."""
  random_run = ROLLOUT(KEYS, params(hops=3), RANDOM_COMMAND)
  return (episode(expert_run(3), 7)["initial_state"], episode(expert_run(3), 7)["final_state"],
          episode(random_run, 9)["final_state"])


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(st.integers(0, TOKENIZER.vocab_size - 1), min_size=A, max_size=A),
       length=st.integers(0, A), command=st.integers(-1, 2 * ENV.num_entities - 1), which=st.integers(0, 2))
def test_random_token_actions_never_break_anything(tokens, length, command, which):
  action = jnp.asarray(tokens, jnp.int32)
  if command >= 0:  # A real command and end of step, random tokens after them, cut at a random length.
    command_tokens, _ = action_of(ENV.commands.text(command))
    action = jnp.where(command_tokens > 0, command_tokens, action)
  state = fuzz_states()[which]
  next_state, obs, obs_len, reward, terminated, truncated, info = STEP(
      jax.random.PRNGKey(5), state, action, jnp.int32(length), params(hops=3, invalid_penalty=-0.1))
  obs = np.asarray(obs)
  assert obs.shape == (ENV.max_obs_len,) and 0 <= obs_len <= ENV.max_obs_len
  assert (obs[obs_len:] == 0).all() and ((obs >= 0) & (obs < TOKENIZER.vocab_size)).all()
  assert float(reward) in (0.0, 1.0, np.float32(-0.1)) and reward.dtype == np.float32
  assert not (terminated and truncated) and (info.success <= terminated)
  assert bool(next_state.done) == bool(state.done or terminated or truncated)
  assert 0 <= next_state.step_count - state.step_count <= 1 and -1 <= next_state.answered < ENV.num_entities
  assert (next_state.facts == state.facts).all() and (next_state.searched >= state.searched).all()
  if not info.parsed:
    assert state.done or decode(obs, obs_len) == INVALID_TEXT


@pytest.mark.parametrize("wording", ["question", "fact"])
def test_think_text_carries_the_decision(wording):
  """The expert restates the fact it just read and names the entity its command copies (hand-built texts), in the
  question's word order ("the r of e is v") or the fact line's ("e has r v")."""
  hops = 3
  run = (THINK_ROLLOUT if wording == "question" else FACT_ROLLOUT)(KEYS[:4], params(hops=hops), EXPERT)
  assert run["success"].any(axis=1).all()
  for b in range(4):
    state, _, _ = THINK_ENV.reset(jax.random.split(KEYS[b], 3)[0], params(hops=hops))  # the runner's reset key
    chain = [NAMES[int(e)] for e in state.chain]
    relation = [RELATIONS[int(r)] for r in state.path]
    fact = ((lambda i: f"the {relation[i - 1]} of {chain[i - 1]} is {chain[i]}") if wording == "question" else
            (lambda i: f"{chain[i - 1]} has {relation[i - 1]} {chain[i]}"))
    expected = [f"<think>find the {relation[0]} of {chain[0]} first</think>search {chain[0]}"]
    expected += [f"<think>{fact(i)}; next the {relation[i]} of {chain[i]}</think>search {chain[i]}"
                 for i in range(1, hops)]
    expected += [f"<think>{fact(hops)}; the answer is {chain[hops]}</think>answer {chain[hops]}"]
    for t, text in enumerate(expected):
      tokens = np.asarray(run["action"][b, t, :run["action_len"][b, t]])
      assert THINK_TOKENIZER.decode(tokens[:-1]) == text and tokens[-1] == THINK_TOKENIZER.end_of_step_id
      assert tokens[:-1].tolist() == THINK_TOKENIZER.encode(text)  # fragments compose to the text's own tokens


def _action_text(run, b: int, t: int) -> str:
  tokens = np.asarray(run["action"][b, t, :run["action_len"][b, t]])
  assert tokens[-1] == THINK_TOKENIZER.end_of_step_id
  return THINK_TOKENIZER.decode(tokens[:-1])


@pytest.mark.parametrize("slip", [1.0, 0.5])
def test_imperfect_expert_misreads_author_as_city(slip):
  """expert_slip: on a question whose last relation is "author" the expert answers, with that probability, the
  value of the "city" fact of the same line, and its think span restates that misread fact; every other question,
  and every search, is the perfect expert's (a reference built from the episode's facts, 128 episodes)."""
  hops = 2
  run = FACT_ROLLOUT(KEYS, params(hops=hops, expert_slip=slip), EXPERT)
  author_questions = misread_answers = 0
  for b in range(NUM_EPISODES):
    state, _, _ = FACT_ENV.reset(jax.random.split(KEYS[b], 3)[0], params(hops=hops))  # the runner's reset key
    chain, path, facts = (np.asarray(x) for x in (state.chain, state.path, state.facts))
    for t in range(hops):
      assert _action_text(run, b, t).endswith(f"</think>search {NAMES[chain[t]]}")

    def answer_step(relation: str, value: int) -> str:
      name = NAMES[value]
      return f"<think>{NAMES[chain[hops - 1]]} has {relation} {name}; the answer is {name}</think>answer {name}"

    text = _action_text(run, b, hops)
    misread = facts[chain[hops - 1], RELATIONS.index("city")]
    if RELATIONS[path[hops - 1]] == "author":
      author_questions += 1
      if text == answer_step("city", misread):
        misread_answers += 1
        assert run["success"][b].any() == (misread == chain[hops])
        continue
    assert text == answer_step(RELATIONS[path[hops - 1]], chain[hops]) and run["success"][b].any()
  assert author_questions >= 20  # about a quarter of the questions end in "author"
  if slip == 1.0:
    assert misread_answers == author_questions
  else:
    assert 0.25 * author_questions <= misread_answers <= 0.75 * author_questions


@pytest.mark.parametrize("skip", [1.0, 0.5])
def test_imperfect_expert_stops_early(skip):
  """expert_skip: after reading the first fact of a 2-hop chain the expert answers, with that probability, the entity
  it just read, its think span restating that (right) fact; a skipped episode ends there, wrong, and every other
  one is the perfect expert's (a reference built from the episode's chain, 128 episodes)."""
  hops = 2
  run = FACT_ROLLOUT(KEYS, params(hops=hops, expert_skip=skip), EXPERT)
  skipped = 0
  for b in range(NUM_EPISODES):
    state, _, _ = FACT_ENV.reset(jax.random.split(KEYS[b], 3)[0], params(hops=hops))  # the runner's reset key
    chain = [NAMES[int(e)] for e in state.chain]
    relation = [RELATIONS[int(r)] for r in state.path]
    assert _action_text(run, b, 0) == f"<think>find the {relation[0]} of {chain[0]} first</think>search {chain[0]}"
    fact = f"<think>{chain[0]} has {relation[0]} {chain[1]}"
    if _action_text(run, b, 1) == f"{fact}; the answer is {chain[1]}</think>answer {chain[1]}":
      skipped += 1
      assert run["terminated"][b, 1] and not run["success"][b].any() and run["final_state"].step_count[b] == 2
      continue
    assert _action_text(run, b, 1) == f"{fact}; next the {relation[1]} of {chain[1]}</think>search {chain[1]}"
    assert run["success"][b, 2] and run["final_state"].step_count[b] == 3
  if skip == 1.0:
    assert skipped == NUM_EPISODES
  else:
    assert 0.35 * NUM_EPISODES <= skipped <= 0.65 * NUM_EPISODES


def test_fewer_relations_per_fact_line():
  """num_relations=2: questions and fact lines use the first two relations only, the expert still solves every
  episode, and the think-format expert's steps restate the shorter lines' facts."""
  words = WordTokenizer(vocabulary(), extra_special_tokens=("<think>", "</think>"))
  env = LookupQA(words, num_entities=16, max_hops=2, num_relations=2, step_format="think", think_wording="fact")
  p = env.default_params().replace(hops=2)
  run = make_env_runner(env, 4)(KEYS[:16], p, EXPERT)
  assert run["success"].any(axis=1).all() and (run["final_state"].step_count == 3).all()
  for b in range(4):
    state = jax.tree_util.tree_map(lambda x: x[b], run["initial_state"])
    assert state.facts.shape == (16, 2) and set(np.asarray(state.path).tolist()) <= {0, 1}
    chain = [NAMES[int(e)] for e in state.chain]
    facts = np.asarray(state.facts)
    line = words.decode(np.asarray(run["obs"][b, 0, :run["obs_len"][b, 0]]))
    assert line == f"{chain[0]}: mentor {NAMES[facts[state.chain[0], 0]]}; city {NAMES[facts[state.chain[0], 1]]}.\n> "
    relation = RELATIONS[int(state.path[0])]
    step = words.decode(np.asarray(run["action"][b, 1, :run["action_len"][b, 1] - 1]))
    assert step.startswith(f"<think>{chain[0]} has {relation} {chain[1]}; next the ")
  assert env.max_obs_lens["facts"] < LookupQA(words, num_entities=16, max_hops=2).max_obs_lens["facts"]
  for bad in (0, 5):
    with pytest.raises(ValueError, match="num_relations"):
      LookupQA(words, num_relations=bad)


def test_think_format_expert_succeeds_and_plain_commands_are_invalid():
  run = THINK_ROLLOUT(KEYS, params(hops=3), EXPERT)
  assert run["success"].any(axis=1).all()
  first_action = THINK_TOKENIZER.decode(run["action"][0, 0, :run["action_len"][0, 0]])
  assert first_action.startswith("<think>") and "</think>search " in first_action
  last_action = THINK_TOKENIZER.decode(run["action"][0, 3, :run["action_len"][0, 3]])
  assert last_action.startswith("<think>the ") and "; the answer is " in last_action and "</think>answer " in last_action
  assert run["action_len"].max() <= THINK_ENV.max_action_len

  plain_action, plain_len = action_of("search Zorva", THINK_TOKENIZER, THINK_ENV.max_action_len)
  think_action, think_len = action_of("<think>hm</think>search Zorva", THINK_TOKENIZER, THINK_ENV.max_action_len)
  given_actions = jnp.stack([plain_action, think_action] * (NUM_STEPS // 2))[None].repeat(NUM_EPISODES, axis=0)
  given_lens = jnp.stack([plain_len, think_len] * (NUM_STEPS // 2))[None].repeat(NUM_EPISODES, axis=0)
  given = THINK_ROLLOUT(KEYS, params(max_steps=NUM_STEPS), GIVEN, given_actions, given_lens)
  assert not given["parsed"][:, 0::2].any() and given["parsed"][:, 1::2].all()
  assert THINK_TOKENIZER.decode(given["obs"][0, 0, :given["obs_len"][0, 0]]) == INVALID_TEXT
  assert THINK_TOKENIZER.decode(given["obs"][0, 1, :given["obs_len"][0, 1]]).startswith("Zorva: mentor ")


def test_render_shows_question_chain_and_status():
  row = episode(expert_run(2), 0)
  initial, final = row["initial_state"], row["final_state"]
  text = ENV.render(initial)
  assert ENV.question_text(initial) in text and "running" in text
  assert all(NAMES[int(e)] in text for e in np.asarray(initial.chain)[:3])
  assert f"answered {NAMES[int(initial.chain[2])]} (correct)" in ENV.render(final)


def test_constructor_validates_settings():
  with pytest.raises(ValueError, match="max_obs_len"):
    LookupQA(TOKENIZER, max_obs_len=ENV.max_obs_len - 1)
  with pytest.raises(ValueError, match="step_format"):
    LookupQA(TOKENIZER, step_format="json")
  with pytest.raises(ValueError, match="think"):
    LookupQA(TOKENIZER, step_format="think")  # No <think> special tokens in this tokenizer.
  with pytest.raises(ValueError, match="think_wording"):
    LookupQA(THINK_TOKENIZER, step_format="think", think_wording="fact_line")
  with pytest.raises(ValueError, match="num_entities"):
    LookupQA(TOKENIZER, num_entities=4, max_hops=4)
  with pytest.raises(ValueError, match="max_action_len"):
    LookupQA(TOKENIZER, max_action_len=8)
  assert LookupQA(TOKENIZER, max_obs_len=256).max_obs_len == 256


def test_word_tokenizer_gives_the_same_texts_in_fewer_tokens():
  """With the environment's own vocabulary every observation decodes to the byte tokenizer's text, a name is one
  token, and the expert (hops 1, the default job) still solves every episode."""
  words = WordTokenizer(vocabulary())
  assert set(NAMES) <= set(words.words) and set(RELATIONS) <= set(words.words)
  env = LookupQA(words, num_entities=16, max_hops=1, max_action_len=6)
  assert env.max_obs_len < ENV.max_obs_len // 3
  assert [len(words.encode(f"search {name}")) for name in env.entity_names] == [3] * 16
  key = jax.random.PRNGKey(5)
  byte_env = LookupQA(TOKENIZER, num_entities=16, max_hops=1)
  p = env.default_params().replace(hops=1)
  state, obs, obs_len = env.reset(key, p)
  _, byte_obs, byte_len = byte_env.reset(key, p)
  assert words.decode(np.asarray(obs)[:int(obs_len)]) == decode(byte_obs, byte_len)
  run = make_env_runner(env, 4)(KEYS[:16], p, EXPERT)
  assert run["success"].any(axis=1).all()
