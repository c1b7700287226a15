"""stepjax.checks: every helper accepts what it documents and rejects the rest with one `field: message` line."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import checks


def raises(field: str, call, message: str = ""):
  """call() raises one ValueError line that starts with `field: ` (then `message`, a regex, if given)."""
  with pytest.raises(ValueError, match="^" + re.escape(field) + ": " + message) as info:
    call()
  assert "\n" not in str(info.value)
  return str(info.value)


def test_fail_and_require():
  assert raises("update.minibatches", lambda: checks.fail("update.minibatches", "3 does not divide 8")) == (
      "update.minibatches: 3 does not divide 8")
  checks.require(True, "x", "never raised")
  checks.require(np.bool_(True), "x", "never raised")
  assert raises("step_len", lambda: checks.require(np.all(np.array([1, 0]) >= 1), "step_len", "needs >= 1")) == (
      "step_len: needs >= 1")


def test_is_tracer_and_is_concrete():
  seen = {}

  @jax.jit
  def f(x):
    seen["tracer"], seen["concrete"] = checks.is_tracer(x), checks.is_concrete({"a": x, "b": 1.0})
    return x

  f(jnp.ones(2))
  assert seen == {"tracer": True, "concrete": False}
  assert not checks.is_tracer(jnp.ones(2)) and not checks.is_tracer(1.0)
  assert checks.is_concrete({"a": jnp.ones(2), "b": np.zeros(3), "c": None}, 1.0)


def test_check_int():
  assert checks.check_int(3, "n") == 3
  assert type(checks.check_int(np.int32(4), "n", minimum=4)) is int
  assert checks.check_int(None, "n", optional=True) is None
  raises("train.seeds", lambda: checks.check_int(0, "train.seeds", minimum=1), r"must be an int >= 1, got 0$")
  raises("n", lambda: checks.check_int(True, "n"), "must be an int, got True")
  raises("n", lambda: checks.check_int(2.0, "n"))
  raises("n", lambda: checks.check_int("2", "n"))
  raises("n", lambda: checks.check_int(None, "n"))
  raises("n", lambda: checks.check_int(-1, "n", minimum=0, optional=True), r"must be an int >= 0 or None, got -1$")


def test_check_number():
  assert checks.check_number(2, "x") == 2.0 and type(checks.check_number(np.float32(0.5), "x")) is float
  assert checks.check_number(0.9, "optim.b1", lambda v: 0 <= v < 1, "in [0, 1)") == 0.9
  assert checks.check_number(None, "x", optional=True) is None
  raises("optim.b1", lambda: checks.check_number(1.0, "optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
         r"must be in \[0, 1\), got 1.0$")
  for bad in (True, float("nan"), float("inf"), "1", None, np.ones(2)):
    raises("x", lambda bad=bad: checks.check_number(bad, "x"), "must be a finite number")
  raises("x", lambda: checks.check_number(-1, "x", lambda v: v >= 0, ">= 0", optional=True), "must be >= 0 or None")


def test_check_hyper_concrete_values():
  in_unit = (lambda v: (v >= 0) & (v <= 1), "in [0, 1]")
  for ok in (None, 0, 1.0, np.float32(0.5), np.array([0.0, 0.3, 1.0]), jnp.asarray(0.2)):
    checks.check_hyper(ok, "gamma", *in_unit)
  raises("gamma", lambda: checks.check_hyper(1.5, "gamma", *in_unit), r"must be in \[0, 1\], got 1.5$")
  raises("gamma", lambda: checks.check_hyper(np.array([0.5, 2.0]), "gamma", *in_unit), r"must be in \[0, 1\]")
  raises("gamma", lambda: checks.check_hyper(True, "gamma", *in_unit))
  raises("gamma", lambda: checks.check_hyper("0.5", "gamma", *in_unit))
  raises("gamma", lambda: checks.check_hyper(object(), "gamma", *in_unit))
  raises("gamma", lambda: checks.check_hyper(np.ones(2) * 0.5, "gamma", *in_unit, scalar=True))


def test_check_hyper_lets_tracers_through_and_checks_their_rank():
  ok, allowed = (lambda v: v > 1), "> 1"

  @jax.jit
  def traced(x):
    checks.check_hyper(x, "dual_clip", ok, allowed, scalar=True)  # 0.5 is out of range, but a tracer is not read
    return x

  traced(0.5)
  jax.vmap(traced)(jnp.array([0.5, 3.0]))  # a vmapped sweep: each traced value is a scalar
  with pytest.raises(ValueError) as info:  # (pytest's match would also read the note jax adds under jit)
    traced(jnp.array([0.5, 3.0]))
  assert str(info.value) == "dual_clip: expected a scalar, got shape (2,)"


def test_check_bool():
  assert checks.check_bool(True, "flag") is True and checks.check_bool(np.bool_(False), "flag") is False
  for bad in (1, 0, "yes", None):
    raises("flag", lambda bad=bad: checks.check_bool(bad, "flag"), "must be a bool")


def test_check_choice():
  assert checks.check_choice("ppo", "algo.loss", ("ppo", "gspo")) == "ppo"
  assert checks.check_choice(None, "whiten", ("step", None)) is None
  raises("algo.loss", lambda: checks.check_choice("dpo", "algo.loss", ("ppo", "gspo", "step_ratio")),
         r"unknown 'dpo'; allowed: ppo, gspo, step_ratio$")
  raises("whiten", lambda: checks.check_choice("batch", "whiten", ("step", "token", None)),
         r"unknown 'batch'; allowed: step, token, None$")
  raises("whiten", lambda: checks.check_choice(None, "whiten", ("step",)), r"unknown None; allowed: step$")
  raises("estimator", lambda: checks.check_choice("dr_grpo", "estimator", ("grpo",), hint=" (Dr.GRPO is 'grpo')"),
         r"unknown 'dr_grpo'; allowed: grpo \(Dr.GRPO is 'grpo'\)$")
  raises("name", lambda: checks.check_choice(["ppo"], "name", ("ppo",)))  # unhashable values are compared safely


def test_check_array_kinds():
  cases = {  # kind: (accepted dtypes, rejected dtypes)
      "float": ((jnp.float32, jnp.bfloat16, jnp.float16), (jnp.int32, jnp.bool_)),
      "int": ((jnp.int32, jnp.uint8, jnp.int8), (jnp.float32, jnp.bool_)),
      "signed": ((jnp.int32, jnp.int8), (jnp.uint32, jnp.float32)),
      "bool": ((jnp.bool_,), (jnp.int32, jnp.float32)),
  }
  for kind, (accepted, rejected) in cases.items():
    for dtype in accepted:
      x = jnp.zeros((2, 3), dtype)
      assert checks.check_array(x, "x", kind) is x
    for dtype in rejected:
      message = raises("x", lambda dtype=dtype: checks.check_array(jnp.zeros(2, dtype), "x", kind), "expected ")
      assert jnp.dtype(dtype).name in message
  assert "(for a 0/1 array pass x > 0)" in raises("mask", lambda: checks.check_array(np.ones(2), "mask", "bool"))
  checks.check_array(np.zeros(3, np.float64), "x", "float")
  checks.check_array(jax.ShapeDtypeStruct((2,), jnp.int32), "x", "int", shape=(2,))  # anything with shape + dtype


def test_check_array_shapes_and_conversion():
  x = np.zeros((2, 3), np.float32)
  assert checks.check_array(x, "x", shape=(2, 3)) is x  # returned as it is
  assert checks.check_array(x, "logp", "float", rank=2, dims="[B, L]") is x
  raises("values", lambda: checks.check_array(x, "values", shape=(2, 4), like="rewards"),
         re.escape("expected shape (2, 4) (the shape of rewards), got (2, 3)") + "$")
  raises("logp", lambda: checks.check_array(x[0], "logp", rank=2, dims="[B, L]"),
         re.escape("expected a rank-2 [B, L] array, got shape (3,)") + "$")
  for bad in (None, "abc", b"abc", {"a": 1}, [1.0, 2.0], 1.0):
    raises("x", lambda bad=bad: checks.check_array(bad, "x"), "expected an array, got ")
  converted = checks.check_array([[1, 2]], "ids", "int", shape=(1, 2), convert=True)
  assert isinstance(converted, jax.Array) and converted.dtype == jnp.int32
  assert checks.check_array(True, "flag", "bool", shape=(), convert=True).shape == ()
  for bad in (None, "abc", {"a": 1}):
    raises("x", lambda bad=bad: checks.check_array(bad, "x", convert=True), "expected an array")
  raises("ids", lambda: checks.check_array([1.5], "ids", "int", convert=True), "expected an integer dtype")


def test_join_field():
  assert checks.join_field("", "rollout.max_len") == "rollout.max_len"
  assert checks.join_field("eval.rollout", "rollout.max_len") == "eval.rollout.max_len"  # no double prefix
  assert checks.join_field("eval.rollout", "rollout") == "eval.rollout"
  assert checks.join_field("update", "update.epochs") == "update.epochs"
  assert checks.join_field("update", "update") == "update"
  assert checks.join_field("update", "epochs") == "update.epochs"
  assert checks.join_field("update.policy_loss", "clip_low") == "update.policy_loss.clip_low"
  assert checks.join_field("update", "updates") == "update.updates"  # only whole names count


def test_section():
  with pytest.raises(ValueError, match=r"^eval\.rollout\.max_len: 1024 is too long$"):
    with checks.section("eval.rollout"):
      checks.fail("rollout.max_len", "1024 is too long")
  with pytest.raises(ValueError, match=r"^update\.policy_loss\.clip_low: must be >= 0$"):
    with checks.section("update"):
      with checks.section("policy_loss"):
        checks.fail("clip_low", "must be >= 0")
  # Not one of ours (no `field: ` head): kept whole under the section.
  with pytest.raises(ValueError, match=r"^model: bad things happened$"):
    with checks.section("model"):
      raise ValueError("bad things happened")
  with pytest.raises(ValueError, match=r"^model: a message: with a colon$"):
    with checks.section("model"):
      raise ValueError("a message: with a colon")
  with pytest.raises(KeyError):  # other errors pass through untouched
    with checks.section("model"):
      raise KeyError("x")
  with checks.section("quiet"):
    pass


def test_section_strip():
  with pytest.raises(ValueError, match=r"^algo\.value_coef: must be >= 0$"):
    with checks.section("algo", strip="update"):
      checks.fail("update.value_coef", "must be >= 0")
