"""Per-environment defaults, so that choosing an environment is one flag: `--config.env.name=textworld_lite`.

A field the base config leaves as None (a placeholder) takes the chosen environment's value here when the runner
builds the config (`resolve`); a field set on the command line or in a config file wins. The values fit together:
the tokenizer has the think tokens the step format needs, max_action_len holds the scripted expert's longest step,
max_len holds an expert episode with room for a few more steps, and the model's positions cover max_len.

The scripted expert under these presets, 64 episodes each (think format; success 1.0 in all three):

| env            | tokenizer | steps / episode (mean, max) | tokens / step (mean, min-max) | tokens / episode (mean, max) |
|----------------|-----------|-----------------------------|-------------------------------|------------------------------|
| lookup_qa      | word      | 3, 3                        | 21.0, 17-24                   | 159, 159                     |
| textworld_lite | byte      | 3.7, 7                      | 33.1, 23-49                   | 555, 827                     |
| grid_nav       | byte      | 7.0, 12                     | 22.1, 21-23                   | 683, 1066                    |

The byte-level environments are here to be one flag away, not to be cheap: their contexts are 4-6x the default's.

Host environments (seeds run one after another) need their data besides the name: `env.data` (a question file) for
search_qa, `env.games` (a directory of games from `textworld_env.make_games`) for textworld. Their expert episodes
under these presets (byte tokenizer, plain format; every episode solved):

| env       | data                                 | steps | tokens / step (mean, max) | obs max | episode (mean, max) |
|-----------|--------------------------------------|-------|---------------------------|---------|---------------------|
| search_qa | 20 generated 2-hop questions (tests) | 3, 3  | 16.0, 17                  | 147     | 411, 420            |
| textworld | 6 games: 3 rooms, 5 objects, quest 3 | 3, 3  | 17.7, 39                  | 649     | 1034, 1246          |

search_qa's lengths are sized for real HotpotQA rather than those short generated paragraphs: a search returns
top_k=2 passages of at most passage_budget=160 characters after titles of up to ~80 (<= ~500 bytes with the cue),
so max_obs_len=512 holds any observation, max_action_len=96 holds `search <title>` for long titles, and max_len=2048
lets the answer step of a 2-search episode start (a step starts only with room for max_action_len + max_obs_len
more tokens). textworld's max_len=2048 leaves the same room after its longest expert prefix (~1250 tokens).
"""

from __future__ import annotations

import ml_collections

# section -> field -> value, per environment. Every field named here is a placeholder (None) in base.py.
ENV_PRESETS: dict[str, dict[str, dict]] = {
    # 2-hop questions over 16 entities, in the think format: every step is a think span that restates the fact
    # just read in the fact line's order ("Zorva has mentor Kalin") and names the next entity, then one command (3
    # steps of 17-24 tokens for a 2-hop question). The question's word order ("the mentor of Zorva is Kalin") left a
    # 2 x 64 model's SFT start at chance after 1,600 steps; see docs/results.md, "Choosing the SFT start".
    "lookup_qa": {
        "": {"tokenizer": "word"},
        "env": {"step_format": "think", "think_wording": "fact", "hops": 2, "max_hops": 2, "num_entities": 16,
                "num_relations": 4},
        "rollout": {"max_steps": 4, "max_len": 256, "max_action_len": 40},
        "model": {"max_position_embeddings": 256, "attention_block": 32},
    },
    # Rooms, doors and containers (ALFWorld-like), 2 rooms: the expert walks, opens, takes and puts in 2-6 steps.
    "textworld_lite": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "think", "num_rooms": 2},
        "rollout": {"max_steps": 8, "max_len": 1024, "max_action_len": 64},
        "model": {"max_position_embeddings": 1024, "attention_block": 32},
    },
    # A 5 x 5 grid with holes, a key and a locked goal: long horizons of short steps.
    "grid_nav": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "think", "size": 5},
        "rollout": {"max_steps": 12, "max_len": 1280, "max_action_len": 64},
        "model": {"max_position_embeddings": 1280, "attention_block": 32},
    },
}

# The same for host environments; kept apart because they cannot be built from the name alone (they need env.data or
# env.games), which is what ENV_PRESETS' environments promise.
HOST_ENV_PRESETS: dict[str, dict[str, dict]] = {
    # Multi-hop QA with a BM25 search tool over the user's HotpotQA-layout file (env.data); 20% of the questions
    # (by a hash of the id) are held out for evaluation. Plain `search <query>` / `answer <text>` lines. Envs on
    # threads: the search is Python and numpy (nothing native to crash), and a worker process per env would import
    # bm25s, which imports JAX and starts its backend: ~2 s of CPU per worker, and +0.2-0.3 ms of CPU per step for
    # the pipe (BENCHMARKS.md, "Host envs in worker processes").
    "search_qa": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "plain", "data_format": "hotpotqa", "held_out_fraction": 0.2, "tool_format": "command",
                "top_k": 2, "passage_budget": 160, "step_timeout": 60.0, "isolation": "thread"},
        "rollout": {"max_steps": 4, "max_len": 2048, "max_action_len": 96, "max_obs_len": 512},
        "model": {"max_position_embeddings": 2048, "attention_block": 32},
    },
    # TextWorld games compiled offline (env.games); 20% of the games (by a hash of the file name) are held out. Every
    # env in a worker process of its own: Jericho's interpreter is native code that has crashed the trainer's
    # process; isolated, a crash ends one episode. It costs ~0.5 s of CPU per worker at the start (parsing the game
    # logic) and 4-14% more CPU per step (BENCHMARKS.md, "Host envs in worker processes").
    "textworld": {
        "": {"tokenizer": "byte"},
        "env": {"step_format": "plain", "held_out_fraction": 0.2, "step_timeout": 60.0, "isolation": "process"},
        "rollout": {"max_steps": 6, "max_len": 2048, "max_action_len": 48, "max_obs_len": 768},
        "model": {"max_position_embeddings": 2048, "attention_block": 32},
    },
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose None fields named by its environment's preset take the preset's values."""
  config = config.copy_and_resolve_references()
  preset = ENV_PRESETS.get(config.env.name, HOST_ENV_PRESETS.get(config.env.name))
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
    # The main job (`make demo`): the lookup_qa preset (2-hop questions, think-format steps of 17-24 tokens, the
    # reward at the end) with an imperfect expert whose mistake is a decision, not a copy: after reading the first
    # fact it stops and answers the entity it just read 60% of the time ("Zorva has mentor Kalin; the answer is
    # Kalin"), so SFT learns to stop early (its greedy start fails every held-out question) while every copy it
    # demonstrates is right. The SFT loss weights the entity tokens 10x, so the copies are learned in 400 steps
    # instead of 600-1,200 (docs/results.md, "The main job's regime").
    "two_hop_skip": {
        "env.expert_skip": 0.6, "sft.entity_weight": 10.0, "sft.steps": 400,
        "train.iterations": 16, "train.eval_every": 8, "train.eval_episodes": 128,
    },
    # The first release's main job: one-hop lookup_qa, plain commands of 2-3 tokens, 2 steps an episode. Cheap
    # (make demo fits in minutes on 2 CPU cores), but a step and its tokens are nearly the same thing there.
    "one_hop": {
        "tokenizer": "word", "env.step_format": "plain", "env.hops": 1, "env.max_hops": 1, "env.num_entities": 16,
        "env.num_relations": 4,
        "rollout.max_steps": 4, "rollout.max_len": 128, "rollout.max_action_len": 6,
        "model.max_position_embeddings": 512, "model.attention_block": 0,
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


# Method variants for the ablations the paper does not run: name -> (config file, fields). `--methods` of
# experiments/ablation.py takes these names beside the config files'; the variant's fields win over the study's.
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    # gamma and lambda at the step level (per step) against the same values at the token level (per token: across
    # a 21-token step lambda = 0.95 shrinks a later step's TD error by 0.95^21 = 0.34 before it reaches the step's
    # first token; token_ppo_lam95 is that config).
    "steppo_lam95": ("steppo", {"algo.lam": 0.95}),
    "steppo_gamma99": ("steppo", {"algo.gamma": 0.99}),
    "token_ppo_gamma99": ("token_ppo", {"algo.gamma": 0.99}),
    # The clip, with StepPO's step advantages held fixed: GSPO's length-normalised step ratio (steppo), the exact
    # step ratio (steppo_exact) and token-level PPO clipping of the same step advantages.
    "steppo_token_clip": ("steppo", {"algo.loss": "ppo"}),
    # A value head on the policy trunk instead of a separate critic network.
    "steppo_head": ("steppo", {"algo.critic": "head"}),
    # A truncated episode bootstrapped from V of its last state instead of ending with value 0.
    "steppo_bootstrap": ("steppo", {"algo.truncation_as_terminal": False}),
}

# The eight methods of the comparison: StepPO (GSPO step ratio, exact step ratio), token-level PPO at lambda 1 and
# 0.95, and the critic-free estimators.
METHODS = ("steppo", "steppo_exact", "token_ppo", "token_ppo_lam95", "grpo", "rloo", "reinforce_pp", "gigpo")

# Grids of studies (`experiments/ablation.py --preset=NAME`): each study is one environment's `run_study` (one SFT
# start shared by its methods) with its own overrides; --set applies to every study and wins over them.
# Sized for about an hour on a 2-core CPU (an RL iteration of 32 episodes per seed: ~1.1 s 2-hop, ~6.4 s grid_nav;
# docs/results.md has its run). The earlier grid's one-hop and perfect-expert 2-hop studies are `--regime=one_hop`
# and the lookup_qa preset with `--sft_steps=1200`; their results stay in docs/results.md.
GRIDS: dict[str, tuple[dict, ...]] = {
    "paper": (
        {"name": "two_hop_skip", "regime": "two_hop_skip", "methods": METHODS + tuple(VARIANTS), "seeds": 3,
         "sets": {},
         "why": "The demo task (`make demo`, the regime two_hop_skip): 2-hop lookup_qa in the think format, 3 steps "
                "of 17-24 tokens, the reward at the end, from an SFT start that learned an expert's wrong decision "
                "(stop after the first fact). The 8 methods and the ablations, where steps are long and one "
                "decision inside a step decides the reward."},
        {"name": "grid_nav", "methods": METHODS, "seeds": 3,
         "sets": {"env.name": "grid_nav", "env.size": 4, "env.step_format": "plain", "rollout.max_len": 640,
                  "rollout.max_action_len": 8, "model.max_position_embeddings": 640, "sft.steps": 200,
                  "train.iterations": 4, "train.eval_every": 2, "train.eval_episodes": 64},
         "why": "A second environment: grid_nav on a 4 x 4 grid with a key, plain moves (6 byte tokens), ~5 steps an "
                "episode, ~460-token contexts; its RL iteration costs ~6x the 2-hop one here, so few iterations."},
    ),
}
