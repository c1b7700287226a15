"""ml_collections config files: `base.py` holds every field; the others set the method (estimator, loss, critic).

`method_config(name, overrides)` loads one method's config (a file here, or a variant: presets.VARIANTS) with
dotted-field overrides; `study_overrides(regime,
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


def method_names() -> list[str]:
  """Every method a study can name: the config files here and the variants of presets.VARIANTS."""
  files = [f[:-3] for f in os.listdir(os.path.dirname(__file__))
           if f.endswith(".py") and f not in ("__init__.py", "base.py", "presets.py")]
  return sorted(files) + list(presets.VARIANTS)


def method_config(method: str, overrides: dict):
  """The config of one method with the study's overrides (dotted field -> value). A variant of presets.VARIANTS is
  its config file with the variant's fields on top of the study's (they define it) and the variant's name."""
  base, variant_fields = presets.VARIANTS.get(method, (method, {}))
  try:
    module = importlib.import_module(f"experiments.configs.{base}")
  except ModuleNotFoundError:
    raise ValueError(f"methods: unknown method {method!r}; allowed: {', '.join(method_names())}") from None
  config = module.get_config()
  _apply(config, overrides)
  _apply(config, variant_fields)
  if variant_fields:
    config.name = method
  return config


def _apply(config, overrides: dict) -> None:
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
