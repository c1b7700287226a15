"""Fragments and CommandTable, the token-space building blocks of pure-JAX environments, and the base class's
template `step` (step budget, done, and the no-op after the end, applied once around `step_env`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from stepjax.envs.base import CommandTable, Environment, Fragments, StepInfo
from stepjax.tokenizers import ByteTokenizer

TOK = ByteTokenizer(extra_special_tokens=("<think>", "</think>"))


def _action(text, width=48, stop=True):
  ids = TOK.encode(text) + ([TOK.end_of_step_id] if stop else [])
  out = np.zeros(width, np.int32)
  out[:len(ids)] = ids
  return out, len(ids)


def test_compose_concatenates_fragments_and_zero_fills():
  texts = ["You see ", "a door", ".", "", "\n> "]
  fragments = Fragments(TOK, texts)
  compose = jax.jit(lambda i: fragments.compose(i, 32))
  rng = np.random.default_rng(0)
  for _ in range(20):
    idx = rng.integers(-1, len(texts), 6)
    tokens, length = compose(jnp.asarray(idx))
    expect = "".join(texts[i] for i in idx if i >= 0)
    assert TOK.decode(np.asarray(tokens[:length])) == expect
    assert int(length) == len(TOK.encode(expect)) == fragments.max_len_of(idx)
    assert (np.asarray(tokens[length:]) == 0).all()


def test_command_table_matches_exact_commands_only():
  table = CommandTable(TOK, ["look", "go north", "take key"])
  match = jax.jit(table.match)
  for text, expect in [("go north", 1), ("look", 0), ("take key", 2), ("take keys", -1), ("go nort", -1), ("", -1),
                       (" look", -1)]:
    assert int(match(*_action(text))) == expect, text
    assert int(match(*_action(text, stop=False))) == expect, text  # a budget-cut action has no stop token
  # An action longer than the view (cut by the caller, true length passed) never matches.
  tokens, n = _action("take key")
  assert int(match(tokens[:8], n)) == -1 and int(match(tokens[:8], 8)) == 2
  # Ids past action_len are ignored.
  tokens, n = _action("look")
  tokens[n:n + 3] = TOK.encode("abc")
  assert int(match(tokens, n)) == 0


def test_think_format():
  table = CommandTable(TOK, ["look", "go north"], think=True)
  for text, expect in [("<think>hmm</think>go north", 1), ("go north", -1), ("<think>x</think>look", 0),
                       ("<think>x look", -1), ("<think></think>look", 0), ("<think>a</think>look now", -1)]:
    assert int(table.match(*_action(text))) == expect, text
  with pytest.raises(ValueError, match="step_format: 'think' needs the special tokens"):
    CommandTable(ByteTokenizer(), ["look"], think=True)


def test_encode_round_trips_through_match():
  table = CommandTable(TOK, ["look", "go north", "take key"])
  think = CommandTable(TOK, ["look", "go north", "take key"], think=True)
  prefix = TOK.encode("<think>ok</think>")
  for i in range(3):
    tokens, length = table.encode(jnp.int32(i), 24, TOK.end_of_step_id)
    assert TOK.decode(np.asarray(tokens[:length])) == table.text(i) + "<|end_of_step|>"
    assert int(table.match(tokens, length)) == i
    tokens, length = think.encode(jnp.int32(i), 40, TOK.end_of_step_id, prefix)
    assert int(think.match(tokens, length)) == i
    assert (np.asarray(tokens[length:]) == 0).all()


@struct.dataclass
class TickParams:
  max_steps: int = 3


@struct.dataclass
class TickState:
  ticks: jax.Array
  step_count: jax.Array
  done: jax.Array


class TickEnv(Environment):
  """Every step says [ticks, ticks] for reward 0.5; action token 7 ends the task. `step_env` knows nothing of the
  budget or of finished episodes, and even writes nonsense into step_count / done: the base owns both."""

  name = "tick"
  max_obs_len = 2
  max_action_len = 1

  def __init__(self):
    self.step_env_calls = 0

  def default_params(self):
    return TickParams()

  def reset(self, key, params):
    return TickState(jnp.int32(0), jnp.int32(0), jnp.bool_(False)), jnp.zeros(2, jnp.int32), jnp.int32(0)

  def step_env(self, key, state, action, action_len, params):
    self.step_env_calls += 1
    ticks = state.ticks + 1
    finish = action[0] == 7
    next_state = state.replace(ticks=ticks, step_count=jnp.int32(-5), done=jnp.bool_(False))
    return (next_state, jnp.stack([ticks, ticks]), jnp.int32(2), jnp.float32(0.5), finish,
            StepInfo(parsed=jnp.bool_(True), success=finish))


def _tick(env, state, token, params=TickParams()):
  return env.step(jax.random.key(0), state, jnp.asarray([token], jnp.int32), jnp.int32(1), params)


def test_base_step_counts_truncates_at_the_budget_and_is_a_no_op_after_the_end():
  env = TickEnv()
  state, _, _ = env.reset(jax.random.key(0), env.default_params())
  for t in range(1, 4):
    assert bool(env.is_last_step(state, env.default_params())) == (t == 3)
    state, obs, obs_len, reward, terminated, truncated, info = _tick(env, state, 0)
    assert int(state.step_count) == t and int(state.ticks) == t  # counted once per step, whatever step_env wrote
    assert list(np.asarray(obs)) == [t, t] and int(obs_len) == 2 and float(reward) == 0.5
    assert not bool(terminated) and bool(truncated) == (t == 3) and bool(state.done) == (t == 3)
    assert bool(info.parsed) and not bool(info.success)
  # A finished episode: the old state, an empty observation, zero reward, no flags, nothing parsed or achieved.
  for token in (0, 7):
    after, obs, obs_len, reward, terminated, truncated, info = _tick(env, state, token)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), after, state))
    assert not np.asarray(obs).any() and int(obs_len) == 0 and float(reward) == 0.0
    assert obs.dtype == jnp.int32 and obs_len.dtype == jnp.int32 and reward.dtype == jnp.float32
    assert not (bool(terminated) or bool(truncated) or bool(info.parsed) or bool(info.success))
  assert env.step_env_calls == 5  # once per step; the base adds the budget and the no-op around it


def test_base_step_terminating_on_the_last_step_is_not_truncated():
  env = TickEnv()
  state, _, _ = env.reset(jax.random.key(0), env.default_params())
  step = jax.jit(lambda state, token: _tick(env, state, token))  # traced: the same rules inside jit
  state, *_ = step(state, 0)
  state, *_ = step(state, 0)
  state, _, _, _, terminated, truncated, info = step(state, 7)
  assert bool(terminated) and not bool(truncated) and bool(info.success) and bool(state.done)
  assert int(state.step_count) == 3
  # Before the budget a terminating step ends the episode too; a budget of 1 truncates the very first step.
  fresh, _, _ = env.reset(jax.random.key(0), env.default_params())
  ended, _, _, _, terminated, truncated, _ = _tick(env, fresh, 7)
  assert bool(terminated) and not bool(truncated) and bool(ended.done)
  ended, _, _, _, terminated, truncated, _ = _tick(env, fresh, 0, TickParams(max_steps=1))
  assert not bool(terminated) and bool(truncated) and bool(ended.done)


def test_step_is_final():
  assert getattr(Environment.step, "__final__", False)
