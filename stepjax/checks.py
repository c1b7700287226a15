"""One home for argument checks. Every failure is one `ValueError` line: `field: what is wrong; what is allowed`.

Configs call these when they are built (before anything compiles); pure functions call them at trace time, where
shapes and dtypes are known and values may be tracers (hyperparameters are then range-checked only when concrete).

    fail("update.minibatches", "3 does not divide the batch size 8")
    require(np.all(step_len[step_mask] >= 1), "step_len", "every valid step needs at least one action token")
    check_int(x, "train.iterations", minimum=1)
    check_number(x, "optim.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    check_hyper(gamma, "gamma", lambda v: 0 <= v <= 1, "in [0, 1]")      # tracers pass through
    check_choice(name, "algo.loss", ("ppo", "gspo", "step_ratio"))
    x = check_array(x, "rewards", "float", shape=(B, S), like="step_mask")
    with section("update.policy_loss"): config.validate()                # field names gain the section prefix
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Callable, Iterator, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Dtype kinds an array check accepts, by name.
_KIND_NAMES = {"float": "a float dtype", "int": "an integer dtype", "signed": "a signed int dtype",
               "bool": "bool"}


def fail(field: str, message: str) -> NoReturn:
  raise ValueError(f"{field}: {message}")


def json_problem(error: Exception) -> str:
  """A json / UTF-8 decoding error as a short phrase: "line 1 column 19: Expecting ',' delimiter"."""
  if isinstance(error, json.JSONDecodeError):
    return f"line {error.lineno} column {error.colno}: {error.msg}"
  if isinstance(error, UnicodeDecodeError):
    return f"not UTF-8 text at byte {error.start}"
  return " ".join(str(error).split())


def read_json(path: str) -> Any:
  """The JSON in the file `path`; one ValueError line naming the file when it is not JSON."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({json_problem(error)})") from None


def require(ok, field: str, message: str) -> None:
  """fail(field, message) unless `ok`: for checks of concrete values that the helpers below do not cover."""
  if not ok:
    fail(field, message)


def is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def is_concrete(*xs) -> bool:
  """No leaf of any argument is a tracer (values can be read on the host)."""
  return not any(is_tracer(leaf) for x in xs for leaf in jax.tree_util.tree_leaves(x))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(x, field: str, minimum: int | None = None, *, optional: bool = False) -> int | None:
  """A Python or numpy int (not a bool), at least `minimum`. Returns it as an int."""
  if optional and x is None:
    return None
  if not _is_int(x) or (minimum is not None and x < minimum):
    bound = f" >= {minimum}" if minimum is not None else ""
    fail(field, f"must be an int{bound}{' or None' if optional else ''}, got {x!r}")
  return int(x)


def check_number(x, field: str, ok: Callable[[float], bool] | None = None, allowed: str = "a finite number", *,
                 optional: bool = False) -> float | None:
  """A finite Python or numpy number (not a bool) for which `ok` holds. Returns it as a float."""
  if optional and x is None:
    return None
  if not _is_number(x) or (ok is not None and not ok(float(x))):
    fail(field, f"must be {allowed}{' or None' if optional else ''}, got {x!r}")
  return float(x)


def check_hyper(x, field: str, ok: Callable[[np.ndarray], Any], allowed: str, *, scalar: bool = False) -> None:
  """A hyperparameter that may be traced (a vmapped sweep): range-checked with `ok` only when concrete.

  None passes (callers decide whether None is allowed). scalar=True also requires a 0-d value.
  """
  if x is None:
    return
  if is_tracer(x):
    if scalar and x.ndim != 0:
      fail(field, f"expected a scalar, got shape {tuple(x.shape)}")
    return
  if isinstance(x, (bool, np.bool_)):
    fail(field, f"must be {allowed}, got {x!r}")
  try:
    value = np.asarray(x)
  except Exception:  # noqa: BLE001 - anything numpy cannot read is not a number
    fail(field, f"must be {allowed}, got {type(x).__name__}")
  if value.dtype.kind not in "iuf" or (scalar and value.ndim != 0):
    fail(field, f"must be {allowed}, got {x!r}")
  if not bool(np.all(ok(value.astype(np.float64)))):
    shown = float(value) if value.ndim == 0 else x
    fail(field, f"must be {allowed}, got {shown}")


def check_bool(x, field: str) -> bool:
  if not isinstance(x, (bool, np.bool_)):
    fail(field, f"must be a bool, got {x!r}")
  return bool(x)


def check_choice(x, field: str, allowed: Sequence[Any], hint: str = "") -> Any:
  """x is one of `allowed` (strings compared by value, None and other objects by identity or equality)."""
  if not any(x is a or (isinstance(x, str) and isinstance(a, str) and x == a) for a in allowed):
    names = ", ".join(a if isinstance(a, str) else repr(a) for a in allowed)
    fail(field, f"unknown {x!r}; allowed: {names}{hint}")
  return x


def _kind_ok(dtype, kind: str) -> bool:
  dtype = jnp.dtype(dtype)
  if kind == "float":
    return jnp.issubdtype(dtype, jnp.floating)
  if kind == "int":
    return jnp.issubdtype(dtype, jnp.integer)
  if kind == "signed":
    return jnp.issubdtype(dtype, jnp.signedinteger)
  if kind == "bool":
    return dtype == jnp.bool_
  raise AssertionError(f"unknown dtype kind {kind!r}")


def check_array(x, field: str, kind: str | None = None, *, shape: Sequence[int] | None = None, rank: int | None = None,
                dims: str = "", like: str = "", convert: bool = False):
  """An array of dtype `kind` ("float" | "int" | "signed" | "bool" | None for any) with `shape` or `rank`.

  convert=True accepts anything `jnp.asarray` takes (lists, numpy, scalars) and returns the jax array; otherwise x
  must already be an array (anything with shape and dtype: numpy, jax, tracers, ShapeDtypeStructs) and is
  returned as it is. dims names the axes for messages ("[B, L]"); like names what `shape` comes from.
  """
  if x is None or isinstance(x, (str, bytes, dict)) or (not convert and not (hasattr(x, "shape")
                                                                           and hasattr(x, "dtype"))):
    fail(field, f"expected an array{' ' + dims if dims else ''}, got {type(x).__name__}")
  if convert:
    x = jnp.asarray(x)
  if rank is not None and len(x.shape) != rank:
    fail(field, f"expected a rank-{rank}{' ' + dims if dims else ''} array, got shape {tuple(x.shape)}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    fail(field, f"expected shape {tuple(shape)}{f' (the shape of {like})' if like else ''}, got {tuple(x.shape)}")
  if kind is not None and not _kind_ok(x.dtype, kind):
    hint = " (for a 0/1 array pass x > 0)" if kind == "bool" else ""
    fail(field, f"expected {_KIND_NAMES[kind]}, got {jnp.dtype(x.dtype).name}{hint}")
  return x


def join_field(prefix: str, field: str) -> str:
  """prefix + "." + field, without repeating a section: ("eval.rollout", "rollout.max_len") -> "eval.rollout.max_len"
  and ("update", "update.epochs") -> "update.epochs"."""
  if not prefix:
    return field
  if field == prefix or field.startswith(prefix + "."):
    return field
  last = prefix.rsplit(".", 1)[-1]
  if field == last or field.startswith(last + "."):
    field = field[len(last):].lstrip(".")
  return f"{prefix}.{field}" if field else prefix


@contextlib.contextmanager
def section(prefix: str, strip: str = "") -> Iterator[None]:
  """Inside, a ValueError `field: message` becomes `prefix.field: message` (see `join_field`).

  strip: a section name the inner code uses for what the caller calls `prefix` (a config built from another config
  section): `section("algo", strip="update")` turns "update.value_coef: ..." into "algo.value_coef: ...".
  """
  try:
    yield
  except ValueError as error:
    message = str(error)
    field, sep, rest = message.partition(": ")
    if not sep or " " in field:  # not one of ours: keep it whole, under the section
      raise ValueError(f"{prefix}: {message}") from None
    if strip and (field == strip or field.startswith(strip + ".")):
      field = field[len(strip):].lstrip(".")
    raise ValueError(f"{join_field(prefix, field) if field else prefix}: {rest}") from None
