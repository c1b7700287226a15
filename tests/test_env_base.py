"""Fragments and CommandTable: the token-space building blocks of pure-JAX environments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax.envs.base import CommandTable, Fragments
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
