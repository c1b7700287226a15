"""Every field of an experiment, with the defaults of the embedded default job (lookup_qa, CPU, minutes).

Run: `python experiments/train.py --config=experiments/configs/steppo.py --workdir=runs/steppo` and override any
field: `--config.algo.estimator=token_gae --config.train.iterations=50`.

Defaults next to what the StepPO reference implementation (PyTorch on veRL) uses at 7B scale:

| field                       | here            | reference                 | why different                              |
|-----------------------------|-----------------|---------------------------|--------------------------------------------|
| algo.gamma / algo.lam       | 1.0 / 1.0       | 1.0 / 1.0 (veRL default)  | -                                          |
| algo.clip (gspo)            | 3e-4 / 4e-4     | 3e-4 / 4e-4 (GSPO paper)  | -                                          |
| algo.clip (ppo, step_ratio) | 0.2 / 0.2       | 0.2 / 0.2 (veRL default)  | -                                          |
| algo.whiten                 | step            | advantages whitened       | -                                          |
| truncation_as_terminal      | True            | True (both terminal)      | see below                                  |
| optim.actor_lr / critic_lr  | 3e-4 / 1e-3     | 1e-6 / 1e-5               | a 0.1M-parameter model trained from SFT    |
| algo.critic                 | separate        | separate critic model     | -                                          |
| algo.epochs x minibatches   | 2 x 2           | 1 x (batch / mini-batch)  | few episodes per iteration on a CPU        |

Truncation: stepjax can bootstrap a truncated episode from V of its last state (truncation_as_terminal=False), the
right target when the episode could have gone on. In lookup_qa the step budget and the context are part of the task,
so an episode that hits them has failed; bootstrapping there let the critic feed on its own estimate: in a measured
run the mean value rose to 2.4 (returns are at most 1), truncated episodes looked valuable, and the policy collapsed
into invalid actions (held-out success 0.55 -> 0.0 for StepPO and token-level PPO). Both are terminal here, as in the
reference.

The environment is lookup_qa with its preset (experiments/configs/presets.py): 2-hop questions over 16 entities in
the think format (each step restates the fact just read, then searches or answers), the environment's word
vocabulary as tokenizer (a name is one token wherever it appears), and a 2-layer 64-wide transformer. The first
release's cheaper one-hop regime, which `make demo` runs, is `presets.REGIMES["one_hop"]`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "steppo"

  # Environment by name: pure-JAX (lookup_qa, textworld_lite, grid_nav; seeds vmapped) or host (search_qa,
  # textworld; Python envs on threads or in worker processes, seeds one after another). Fields left None take the environment's preset
  # (experiments/configs/presets.py), so switching environments is this one field (plus the data of a host env).
  c.env = ml_collections.ConfigDict(dict(
      name="lookup_qa",
      step_format=config_dict.placeholder(str),  # "plain" (a command) or "think" (<think>...</think> + a command)
      # lookup_qa: difficulty, pool size and the largest hop count the buffers are sized for.
      hops=config_dict.placeholder(int), max_hops=config_dict.placeholder(int),
      num_entities=config_dict.placeholder(int),
      num_relations=config_dict.placeholder(int),  # lookup_qa: relations per fact line, the first 1-4 of 4
      # lookup_qa's think spans: "question" ("the r of e is v") or "fact" ("e has r v", the fact line's order).
      think_wording=config_dict.placeholder(str),
      num_rooms=config_dict.placeholder(int),  # textworld_lite
      size=config_dict.placeholder(int),  # grid_nav: the side of the grid
      invalid_penalty=0.0,
      # lookup_qa: probability that the scripted expert (the SFT demonstrations) answers a question ending in "author"
      # from the "city" fact instead: an imperfect expert that leaves room for RL (0.0: the perfect expert).
      expert_slip=0.0,
      # lookup_qa: probability that the expert, after reading each fact but the last, answers the entity just read
      # instead of following the chain: an imperfect decision, not an imperfect copy (0.0: the perfect expert).
      expert_skip=0.0,
      # search_qa: the question file (required) and its format (hotpotqa, 2wikimultihopqa, musique); an optional
      # corpus JSONL of {"title", "text"} passages (None: the questions' context paragraphs); where the BM25 index is
      # saved (None: <data>.bm25 next to the question file); "command" or "tags" calls; passages per search and the
      # characters kept of each.
      data=config_dict.placeholder(str), data_format=config_dict.placeholder(str),
      corpus=config_dict.placeholder(str), index_dir=config_dict.placeholder(str),
      tool_format=config_dict.placeholder(str), top_k=config_dict.placeholder(int),
      passage_budget=config_dict.placeholder(int),
      # textworld: a directory of compiled games (.z8 with its .json, from stepjax.envs.textworld_env.make_games).
      games=config_dict.placeholder(str),
      # Host envs: the fraction of questions (games) held out for evaluation, chosen by a hash of the id (file name).
      held_out_fraction=config_dict.placeholder(float),
      # Host envs: seconds a reset or step may take before its episode is truncated and the env replaced (None: none).
      step_timeout=config_dict.placeholder(float),
      # Host envs: "thread" (every env an object of the trainer's process, called on threads) or "process" (every env
      # in a worker process of its own: a native crash of an env, a segfault in its interpreter, ends its episode
      # and restarts its worker instead of killing the run). None: the environment's preset.
      isolation=config_dict.placeholder(str),
  ))
  # "byte", "word" (the environment's vocabulary as whole-word tokens, bytes for the rest), or a tokenizer.json
  # path; the think format adds <think> / </think> to byte and word tokenizers. None: the environment's preset.
  c.tokenizer = config_dict.placeholder(str)
  # A tokenizer.json's tokens for stepjax's three reserved roles, by name (e.g. end_of_step="<|im_end|>"). None: the
  # chat template's choice (below), else the stepjax default (<|end_of_step|>, <|end_of_episode|>, <|pad|>), added
  # to the vocabulary when absent (a checkpoint's embedding must then have room for it).
  c.special_tokens = ml_collections.ConfigDict(dict(
      end_of_step=config_dict.placeholder(str), end_of_episode=config_dict.placeholder(str),
      pad=config_dict.placeholder(str),
  ))
  # Host environments in a chat model's format (stepjax/chat.py): "none" (observations and actions as they are),
  # "chatml" (Qwen2.5, Qwen3) or "llama3". Each observation becomes a user turn plus the assistant header, each
  # action ends with the turn-end token (then the end-of-step token; the end-of-episode and pad tokens default to
  # the template's <|endoftext|> / <|end_of_text|>), `system` is an optional system message first. The template's
  # tokens are looked up by name in the tokenizer; None takes the template's, "" drops begin / header_end.
  c.chat = ml_collections.ConfigDict(dict(
      template="none", system="",
      begin=config_dict.placeholder(str), turn_start=config_dict.placeholder(str),
      header_end=config_dict.placeholder(str), turn_end=config_dict.placeholder(str),
  ))

  # Model: a preset with overrides, or a Hugging Face checkpoint directory (safetensors) in `checkpoint`.
  c.model = ml_collections.ConfigDict(dict(
      preset="tiny", checkpoint="",
      hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      max_position_embeddings=config_dict.placeholder(int),  # None: the environment's preset
      dtype="float32",  # compute dtype; "bfloat16" on accelerators
      # query rows per block of the training forward's causal attention (0: plain); None: the environment's preset
      attention_block=config_dict.placeholder(int),
      # Storage dtype of the parameters, the reference copy and the gradients: "float32", or "bfloat16" to halve them
      # (a step below half a bfloat16 ulp of a weight is then lost: docs/design.md, "Numerics"). With model.checkpoint the weights load in float32 (experiments/export_hf.py reads them back so): leave it.
      param_dtype="float32",
      # Rematerialisation of each layer in the backward pass: False, True (save nothing) or the name of a
      # jax.checkpoint_policies policy ("dots_saveable", ...): memory for compute on long contexts. Typed `object` so
      # --config.model.remat takes a bool or a name.
      remat=config_dict.FieldReference(False, field_type=object),
      # Layers under nn.scan (params with a leading layers axis): one compiled layer instead of num_layers copies.
      scan_layers=False,
  ))

  # Episodes per iteration: num_tasks x episodes_per_task (the groups of GRPO / RLOO / GiGPO).
  c.rollout = ml_collections.ConfigDict(dict(
      num_tasks=8, episodes_per_task=4,
      # None: the environment's preset (a step budget, a context that holds an expert episode, the longest step).
      max_steps=config_dict.placeholder(int), max_len=config_dict.placeholder(int),
      max_action_len=config_dict.placeholder(int),
      max_obs_len=config_dict.placeholder(int),  # host envs: the longest observation (JAX envs size their own)
      temperature=1.0, top_k=0, top_p=1.0,
  ))

  # The method: estimator x policy loss x critic.
  c.algo = ml_collections.ConfigDict(dict(
      estimator="step_gae",  # step_gae, token_gae, grpo, rloo, reinforce_pp, reinforce_pp_baseline, gigpo
      loss="gspo",  # gspo, ppo, step_ratio
      critic="separate",  # "separate" (own network, from the policy), "head" (value head on the policy), "none"
      gamma=1.0, lam=1.0,
      whiten="step",  # "step", "token" or "none"
      truncation_as_terminal=True,  # the step budget and the context are part of lookup_qa's task
      normalize_std=True,  # GRPO: False is Dr.GRPO
      gigpo_omega=1.0,
      clip_low=config_dict.placeholder(float), clip_high=config_dict.placeholder(float),  # None: the loss default
      dual_clip=config_dict.placeholder(float),
      agg_mode="token-mean",
      value_coef=0.5, value_clip=config_dict.placeholder(float),
      kl_coef=0.0, kl_kind="low_var_kl", entropy_coef=0.0,
      epochs=2, minibatches=2,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      actor_lr=3e-4, critic_lr=1e-3, weight_decay=0.0, max_grad_norm=1.0,
      # A fresh Adam takes lr-sized steps in every coordinate at first: warm up instead of jolting the SFT policy.
      schedule="warmup_constant", warmup_steps=20, total_steps=config_dict.placeholder(int),
      # What the optimizer computes in and keeps both Adam moments in: "float32" whatever model.param_dtype is, or
      # None to follow the params (with bfloat16 params Adam's b2 = 0.999 rounds to 1: avoid). Typed `object` for None.
      state_dtype=config_dict.FieldReference("float32", field_type=object),
  ))

  # SFT warm start on scripted-expert episodes (steps=0 starts RL from the random or loaded model).
  # entity_weight: the SFT loss weight of the action tokens that name one of the environment's entities (lookup_qa's
  # names: what a think span and a command copy from the question and the fact lines), against 1 for every other
  # action token; > 1 makes the few copied tokens count beside the think text around them (docs/results.md).
  c.sft = ml_collections.ConfigDict(dict(steps=300, num_tasks=32, lr=3e-3, per_seed=False, entity_weight=1.0))

  c.train = ml_collections.ConfigDict(dict(
      iterations=30,
      seeds=3,  # seeds seed_offset ... seed_offset + seeds - 1: vmapped in one program (JAX envs), in turn (host)
      seed_offset=0,
      seeds_at_once=0,  # > 0 (JAX envs): the seeds run in groups of this many, one group after another (0: all at once)
      eval_every=5,  # iterations between held-out evaluations (must divide iterations)
      eval_episodes=256,
      eval_seed=1_000_003,  # held-out task keys come from this seed only; training keys never do
      task_pool=0,  # > 0: train on a fixed pool of this many tasks (a training set), drawn from task_pool_seed
      task_pool_seed=17,
      checkpoint_every=1,  # evaluations between checkpoints
      keep_checkpoints=3,
      halt_on_nonfinite=False,
  ))

  # The device mesh every program runs on (stepjax/sharding.py): axis sizes data x fsdp x tensor, -1 for the rest of
  # the devices (at most one -1), and the logical-axis rule table: "dp" (parameters replicated), "fsdp" (parameters
  # split along embed over fsdp), "tp" (heads, mlp and vocab over tensor) or "fsdp_tp" (both; axes of size 1 are
  # no-ops). All 1, the default: one device and today's unsharded programs. Otherwise the sizes must multiply to
  # jax.device_count() (every process's devices, after jax.distributed.initialize: experiments/train.py
  # --distributed=auto), the seeds stay vmapped (their axis replicated) and each seed's episodes split over data x
  # fsdp, so every batch (rollout.num_tasks x episodes_per_task, its minibatches, train.eval_episodes, sft.num_tasks)
  # must divide by data x fsdp. Without room for every seed's state at once, train.seeds_at_once runs them in groups.
  # Host environments run on a mesh too, one process or several (each stepping the envs of its share of the rows).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, rules="fsdp_tp"))

  c.log = ml_collections.ConfigDict(dict(tensorboard=True, progress=True))
  return c
