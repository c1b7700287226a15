"""ml_collections config files: `base.py` holds every field; the others set the method (estimator, loss, critic).

`method_config(name, overrides)` loads one method's config with dotted-field overrides; `study_overrides(regime,
sets)` turns a named regime (presets.REGIMES) and `field=value` strings into those overrides.
"""

import importlib
import os

from experiments.configs import presets


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def study_overrides(regime: str | None, sets: list[str]) -> dict:
  """Dotted field -> value from a named regime (presets.REGIMES) and `field=value` strings (which win over it)."""
  overrides = {}
  if regime is not None:
    if regime not in presets.REGIMES:
      raise ValueError(f"regime: unknown {regime!r}; allowed: {', '.join(presets.REGIMES)}")
    overrides.update(presets.REGIMES[regime])
  for item in sets:
    field, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"set: expected field=value, got {item!r}")
    overrides[field] = _parse_value(value)
  return overrides


def method_config(method: str, overrides: dict):
  """The config of one method with the study's overrides (dotted field -> value)."""
  try:
    module = importlib.import_module(f"experiments.configs.{method}")
  except ModuleNotFoundError:
    available = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__))
                       if f.endswith(".py") and f not in ("__init__.py", "base.py", "presets.py"))
    raise ValueError(f"methods: unknown method {method!r}; allowed: {', '.join(available)}") from None
  config = module.get_config()
  for field, value in overrides.items():
    *path, leaf = field.split(".")
    node = config
    try:
      for part in path:
        node = node[part]
      if leaf not in node:
        raise KeyError(leaf)
    except KeyError:
      raise ValueError(f"set: {field!r} is not a config field") from None
    node[leaf] = value
  return config
