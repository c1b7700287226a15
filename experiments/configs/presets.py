"""Per-environment defaults, so that choosing an environment is one flag: `--config.env.name=textworld_lite`.

A field the base config leaves as None (a placeholder) takes the chosen environment's value here when the runner
builds the config (`resolve`); a field set on the command line or in a config file wins. The values fit together:
the tokenizer has the think tokens the step format needs, max_action_len holds the scripted expert's longest step,
max_len holds an expert episode with room for a few more steps, and the model's positions cover max_len.

The scripted expert under these presets, 64 episodes each (think format; success 1.0 in all three):

| env            | tokenizer | steps / episode (mean, max) | tokens / step (mean, min-max) | tokens / episode (mean, max) |
|----------------|-----------|-----------------------------|-------------------------------|------------------------------|
| lookup_qa      | word      | 3, 3                        | 23.7, 17-28                   | 167, 167                     |
| textworld_lite | byte      | 3.7, 7                      | 33.1, 23-49                   | 555, 827                     |
| grid_nav       | byte      | 7.0, 12                     | 22.1, 21-23                   | 683, 1066                    |

The byte-level environments are here to be one flag away, not to be cheap: their contexts are 4-6x the default's.
"""

from __future__ import annotations

import ml_collections

# section -> field -> value, per environment. Every field named here is a placeholder (None) in base.py.
ENV_PRESETS: dict[str, dict[str, dict]] = {
    # 2-hop questions over 16 entities, in the think format: every step is a think span that restates the fact
    # just read and names the next entity, then one command (3 steps of 17-28 tokens for a 2-hop question).
    "lookup_qa": {
        "": {"tokenizer": "word"},
        "env": {"step_format": "think", "hops": 2, "max_hops": 2, "num_entities": 16},
        "rollout": {"max_steps": 4, "max_len": 256, "max_action_len": 40},
        "model": {"max_position_embeddings": 256},
    },
    # Rooms, doors and containers (ALFWorld-like), 2 rooms: the expert walks, opens, takes and puts in 2-6 steps.
    "textworld_lite": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "think", "num_rooms": 2},
        "rollout": {"max_steps": 8, "max_len": 1024, "max_action_len": 64},
        "model": {"max_position_embeddings": 1024},
    },
    # A 5 x 5 grid with holes, a key and a locked goal: long horizons of short steps.
    "grid_nav": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "think", "size": 5},
        "rollout": {"max_steps": 12, "max_len": 1280, "max_action_len": 64},
        "model": {"max_position_embeddings": 1280},
    },
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose None fields named by its environment's preset take the preset's values."""
  config = config.copy_and_resolve_references()
  preset = ENV_PRESETS.get(config.env.name)
  if preset is None:
    return config  # the runner names the allowed environments
  for section, fields in preset.items():
    node = config if not section else config[section]
    for name, value in fields.items():
      if name in node and node[name] is None:
        node[name] = value
  return config


# Named regimes: field overrides for a whole study (`experiments/ablation.py --regime=NAME`; --set wins over them).
REGIMES: dict[str, dict[str, object]] = {
    # The first release's main job: one-hop lookup_qa, plain commands of 2-3 tokens, 2 steps an episode. Cheap
    # (make demo fits in minutes on 2 CPU cores), but a step and its tokens are nearly the same thing there.
    "one_hop": {
        "tokenizer": "word", "env.step_format": "plain", "env.hops": 1, "env.max_hops": 1, "env.num_entities": 16,
        "rollout.max_steps": 4, "rollout.max_len": 128, "rollout.max_action_len": 6,
        "model.max_position_embeddings": 512,
    },
}


def with_regime(config: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
  """`config` with the overrides of regime `name` applied in place (None or "none": unchanged)."""
  if name in (None, "none"):
    return config
  if name not in REGIMES:
    raise ValueError(f"regime: unknown {name!r}; allowed: {', '.join(REGIMES)}")
  for field, value in REGIMES[name].items():
    section, _, leaf = field.rpartition(".")
    (config[section] if section else config)[leaf] = value
  return config
