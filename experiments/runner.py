"""One experiment from an ml_collections config: build, SFT warm start, RL with held-out evaluation, logs, checkpoints.

`build(config)` turns a config (experiments/configs/base.py lists every field) into stepjax objects and checks every
field first: a wrong name or an impossible size is one ValueError line naming the field, before anything compiles.

`run(config, workdir)` (pure-JAX environments) trains `train.seeds` runs in one program (`jax.vmap` over seeds), or
in groups of `train.seeds_at_once` seeds one after another when the devices have no room for all of them at once:

  SFT     `train.sft.steps` behaviour-cloning steps on scripted-expert episodes (once, shared by every seed, or once
          per seed with `sft.per_seed`), in jitted chunks of `lax.scan`;
  RL      `train.iterations` iterations of `train.make_train_iteration` (rollout + update), jitted in chunks of
          `train.eval_every` iterations (one `lax.scan` each, the state donated);
  eval    after the SFT start and after every chunk, `train.eval_episodes` held-out episodes per seed, greedy and
          sampled, on task keys drawn from `train.eval_seed` (never from a training key);
  logs    workdir/metrics.jsonl (one line per iteration and seed), eval.jsonl, sft.jsonl, TensorBoard event files
          under workdir/tb/seed<k> (tensorboardX, no TensorFlow), a progress bar, and a summary table at the end;
  ckpt    an orbax checkpoint of the stacked TrainState every `checkpoint_every` evaluations (asynchronous,
          keep-last-k, atomic). `run(..., resume=True)` restores the newest complete and readable one (a damaged newer
          one is named and set aside), cuts the logs back to it (a line torn by a kill is dropped) and continues
          bit-identically (same compiled chunk, same keys: everything random lives in the state). A run without
          resume starts over: an earlier run's checkpoints, logs and TensorBoard files in the workdir go.
  failure a checkpoint or log that cannot be written (full or read-only disk) stops the run with one OSError line; the
          previous checkpoint stays intact (`drills/kill.py` and `drills/disk.py` exercise this).

`run` on a host environment (search_qa, textworld) hands over to `experiments.host_runner`: the same config, logs,
checkpoints and resume, with the seeds one after another.

On a device mesh (config.mesh, sizes other than all 1): `build` makes the mesh over every device of every process and
checks that the model's split dimensions and every batch divide by it. The programs above are the same functions,
jitted with explicit shardings under the logical-axis rules (`stepjax.sharding`): the stacked TrainState (policy,
critic, reference policy, Adam moments) is laid out by the rules with its leading seed axis replicated, and the
model's `nn.with_logical_constraint`s split each seed's episodes (rollout, update, evaluation, SFT) over data x fsdp;
the seeds stay vmapped (in groups of train.seeds_at_once, if set). With several processes
(`jax.distributed.initialize`, experiments/train.py) each runs the same program; process 0 alone writes the logs,
TensorBoard files and config.json, shows progress and prints, and every process writes its shards of each checkpoint
(orbax's multi-process save; a resume restores into the shardings). Host environments run on a mesh too, in one
process or several (experiments/host_runner.py: each process steps the envs of its share of the rows, the programs run
over the mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import report
from experiments.configs import presets
from stepjax import chat as chat_lib
from stepjax import checks
from stepjax import credit as credit_lib
from stepjax import losses
from stepjax import rollout as rollout_lib
from stepjax import sharding as sharding_lib
from stepjax import train
from stepjax.envs import grid_nav, lookup_qa, textworld_lite
from stepjax.models import hf
from stepjax.models.transformer import PRESETS, ModelConfig, get_config, param_logical_axes
from stepjax.models.value import ValueConfig, init_models
from stepjax.train import checkpoint as checkpoint_lib
from stepjax.train import sft as sft_lib
from stepjax.train import state as state_lib
from stepjax.tokenizers import (BYTE_SPEC, TOKENIZER_FILE_NAME, ByteTokenizer, WordTokenizer, load_tokenizer,
                                read_tokenizer_file)

JAX_ENVS = ("lookup_qa", "textworld_lite", "grid_nav")
HOST_ENVS = ("search_qa", "textworld")
CRITICS = ("head", "separate", "none")
WHITEN = ("step", "token", "none")
MODEL_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "max_position_embeddings", "dtype", "attention_block", "param_dtype", "remat", "scan_layers")
# Keys of metrics.jsonl that depend on the machine, not on the run (left out when comparing runs).
TIMING_KEYS = ("time_s", "agent_steps_per_s", "tokens_per_s", "env_steps_per_s")


# ------------------------------------------------------------------------------------------------------
# Config -> stepjax objects.
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` makes of a config. Host environments have `host` and no `env` / `env_params`."""

  config: ml_collections.ConfigDict
  tokenizer: Any
  env: Any  # a pure-JAX Environment (None for a host environment)
  env_params: Any
  model_config: ModelConfig
  checkpoint_params: dict | None  # Transformer params loaded from model.checkpoint
  rollout_config: rollout_lib.RolloutConfig
  update_config: train.UpdateConfig
  optim_config: train.OptimConfig
  sft_optim_config: train.OptimConfig
  sft_rollout_config: rollout_lib.RolloutConfig
  seeds: tuple[int, ...]
  host: Any = None  # host_runner.HostEnvs for a host environment
  # The device mesh (config.mesh) and its logical-axis rules; None for one device (the default), so that the
  # unsharded programs run exactly as they always have.
  mesh: Any = None
  rules: tuple | None = None
  # [V] SFT loss weights by token id (sft.entity_weight), None for the plain token mean.
  sft_token_weights: Any = None


THINK_TOKENS = ("<think>", "</think>")


ROLES = ("end_of_step", "end_of_episode", "pad")


def _check_chat(config) -> None:
  """chat.template is known; with "none" no other chat field is set; a template needs a host environment."""
  c = config.chat
  checks.check_choice(c.template, "chat.template", chat_lib.TEMPLATE_NAMES)
  if c.template == chat_lib.NONE:
    for field in chat_lib.TOKEN_FIELDS + ("system",):
      if c[field]:
        checks.fail(f"chat.{field}", f"{c[field]!r} is set but chat.template is 'none'; choose a template "
                    f"({', '.join(chat_lib.TEMPLATES)}) or leave it unset")
  elif config.env.name not in HOST_ENVS:
    checks.fail("chat.template", f"{c.template!r} applies to host environments ({', '.join(HOST_ENVS)}); "
                f"{config.env.name} builds its observations inside JAX: use 'none'")


def _role_token_names(config) -> dict[str, tuple[str | None, str]]:
  """role -> (token name or None, the config field it comes from): special_tokens.<role>, else with a chat template
  its turn end for end_of_step (always: every action ends with it) and its end-of-episode token for end_of_episode
  and pad. None leaves the role to the tokenizer's default."""
  s, c = config.special_tokens, config.chat
  for role in ROLES:
    if s[role] is not None and (not isinstance(s[role], str) or not s[role]):
      checks.fail(f"special_tokens.{role}", f"must be a token name or None, got {s[role]!r}")
  names = {role: (s[role], f"special_tokens.{role}") for role in ROLES}
  if c.template == chat_lib.NONE:
    return names
  with checks.section("chat"):
    turn_end = chat_lib.template_token_names(c.template, turn_end=c.turn_end)["turn_end"]
  if s.end_of_step is not None and s.end_of_step != turn_end:
    checks.fail("special_tokens.end_of_step", f"{s.end_of_step!r} is not the chat's turn end {turn_end!r}: every "
                "action ends with the turn end, which is then the end-of-step token; leave it None (or set "
                "chat.turn_end)")
  names["end_of_step"] = (turn_end, "chat.turn_end" if c.turn_end else "chat.template")
  if s.end_of_episode is None:
    names["end_of_episode"] = (chat_lib.TEMPLATES[c.template].end_of_episode, "chat.template")
  if s.pad is None:
    names["pad"] = names["end_of_episode"]
  return names


def _check_role_tokens(spec: str, names: dict[str, tuple[str | None, str]], template: str) -> None:
  """Every named role token is a token of the tokenizer.json `spec`, and end of step and end of episode differ."""
  path = os.path.join(spec, TOKENIZER_FILE_NAME) if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    return  # load_tokenizer names the missing file
  vocabulary = read_tokenizer_file(path)  # a file that does not load is one line naming it
  for role, (name, field) in names.items():
    if name is None or vocabulary.token_to_id(name) is not None:
      continue
    if field == "chat.template":
      checks.fail(field, f"{template!r} takes {name!r} as the {role} token, which {path} lacks; set "
                  f"{'chat.turn_end' if role == 'end_of_step' else 'special_tokens.' + role} to one of its tokens")
    checks.fail(field, f"{name!r} is not a token of {path}; name one of its tokens")
  (step, _), (episode, episode_field) = names["end_of_step"], names["end_of_episode"]
  if step is not None and step == episode:
    checks.fail(episode_field, f"{episode!r} is the end-of-step token too; the episode's end must be another token")


def _tokenizer(config):
  """The tokenizer named by config.tokenizer; the think step format adds its two special tokens to byte and word
  tokenizers (a tokenizer.json must already have them). A tokenizer.json's reserved roles come from special_tokens
  and the chat template (`_role_token_names`)."""
  spec, env_name = config.tokenizer, config.env.name
  extra = THINK_TOKENS if config.env.step_format == "think" else ()
  _check_chat(config)
  names = _role_token_names(config)
  if spec in ("word", BYTE_SPEC):
    if config.chat.template != chat_lib.NONE:
      checks.fail("chat.template", f"{config.chat.template!r} needs a tokenizer.json that holds its tokens; "
                  f"config.tokenizer is {spec!r}")
    for name, field in names.values():
      if name is not None:
        checks.fail(field, f"{name!r}: the {spec!r} tokenizer's reserved tokens are fixed; map them only for a "
                    f"tokenizer.json")
  if spec == "word":
    if env_name != "lookup_qa":
      checks.fail("tokenizer", f"'word' needs an environment with a word vocabulary (lookup_qa), not {env_name!r}; "
                  f"use {BYTE_SPEC!r} or a tokenizer.json path")
    return WordTokenizer(lookup_qa.vocabulary(), extra_special_tokens=extra)
  if spec == BYTE_SPEC:
    return ByteTokenizer(extra_special_tokens=extra)
  if not isinstance(spec, str) or not os.path.exists(spec):
    checks.fail("tokenizer", f"{spec!r} is not allowed; use 'byte', 'word' or an existing tokenizer.json path")
  mapped = {role: name for role, (name, _) in names.items() if name is not None}
  if mapped:
    _check_role_tokens(spec, names, config.chat.template)
  with checks.section("tokenizer"):
    return load_tokenizer(spec, **mapped)


def chat_format(config, tokenizer) -> chat_lib.ChatFormat | None:
  """The chat format of config.chat over `tokenizer` (None for "none"); a bad field is one line naming it."""
  c = config.chat
  _check_chat(config)
  if c.template == chat_lib.NONE:
    return None
  with checks.section("chat"):
    return chat_lib.make_chat_format(tokenizer, c.template, system=c.system,
                                     **{field: c[field] for field in chat_lib.TOKEN_FIELDS})


def _jax_env(config, tokenizer):
  e, r = config.env, config.rollout
  with checks.section("env"):
    if e.name == "lookup_qa":
      env = lookup_qa.LookupQA(tokenizer, num_entities=e.num_entities, max_hops=e.max_hops,
                               num_relations=e.num_relations, max_action_len=r.max_action_len,
                               step_format=e.step_format, think_wording=e.think_wording)
      if not 1 <= e.hops <= e.max_hops:
        checks.fail("hops", f"must be in [1, env.max_hops={e.max_hops}], got {e.hops!r}")
      for field in ("expert_slip", "expert_skip"):
        checks.check_number(e[field], field, lambda v: 0 <= v <= 1, "in [0, 1]")
      params = env.default_params().replace(hops=e.hops, max_steps=r.max_steps, invalid_penalty=e.invalid_penalty,
                                            expert_slip=float(e.expert_slip), expert_skip=float(e.expert_skip))
    else:
      for field in ("expert_slip", "expert_skip"):
        if e[field]:
          checks.fail(field, f"only lookup_qa has an imperfect expert; {e.name} takes 0.0, got {e[field]!r}")
    if e.name == "textworld_lite":
      env = textworld_lite.TextWorldLite(tokenizer, num_rooms=e.num_rooms, max_action_len=r.max_action_len,
                                         step_format=e.step_format)
      params = env.default_params().replace(max_steps=r.max_steps)
    elif e.name == "grid_nav":
      env = grid_nav.GridNav(tokenizer, max_size=e.size, max_action_len=r.max_action_len, step_format=e.step_format)
      params = env.default_params().replace(size=e.size, max_steps=r.max_steps, invalid_penalty=e.invalid_penalty)
  return env, params


# ------------------------------------------------------------------------------------------------------
# The device mesh (config.mesh).
# ------------------------------------------------------------------------------------------------------


class _MeshError(ValueError):
  """A model that cannot be laid out on the mesh, found while loading a checkpoint: its line names a model field and
  must not be renamed model.checkpoint like the loader's own errors."""


def _mesh(config) -> tuple[Any, tuple | None]:
  """(mesh, rules) of config.mesh, or (None, None) for one device (sizes all 1 in one process: today's programs).

  Every problem is one line naming a mesh field, before anything compiles: a size that is not an int >= 1 or -1, two
  -1s, an unknown rule table, sizes that do not multiply to jax.device_count() (all processes' devices)."""
  m = config.get("mesh")
  if m is None:  # a config from before the mesh section (e.g. an old run's config.json)
    return None, None
  sizes = {}
  for axis in sharding_lib.MESH_AXES:
    size = m.get(axis, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      checks.fail(f"mesh.{axis}", f"must be an int >= 1, or -1 for the rest of the devices, got {size!r}")
    sizes[axis] = int(size)
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    checks.fail(f"mesh.{free[1]}", f"at most one axis may be -1 (the rest of the devices); mesh.{free[0]} is -1 too")
  with checks.section("mesh", strip="sharding"):
    rules = sharding_lib.get_rules(m.get("rules", "fsdp_tp"))
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fixed == 1 and jax.process_count() == 1 and (not free or jax.device_count() == 1):
    return None, None
  shown = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
  devices = jax.device_count()
  if free:
    if devices % fixed:
      checks.fail(f"mesh.{free[0]}", f"-1 takes the rest of the {devices} devices, but the other axes ({shown}) "
                  f"multiply to {fixed}, which does not divide {devices}")
    sizes[free[0]] = devices // fixed
  elif fixed != devices:
    field = next((f"mesh.{a}" for a, size in sizes.items() if size != 1), "mesh.data")
    processes = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    checks.fail(field, f"{shown} multiply to {fixed}, but there {'is' if devices == 1 else 'are'} {devices} "
                f"device{'s' * (devices != 1)}{processes} (jax.device_count()); the sizes must multiply to it (one "
                "axis may be -1: the rest)")
  return sharding_lib.make_mesh(sizes), rules


def _axes_size(mesh, rules: tuple, logical: str) -> tuple[int, str]:
  """(number of shards, the mesh axes joined by x) that `rules` splits the logical axis `logical` into."""
  axes = dict(rules).get(logical)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes), " x ".join(axes)


# Logical axis of the parameters and activations -> the ModelConfig field that sizes it.
_MODEL_AXES = (("embed", "hidden_size"), ("heads", "num_heads"), ("kv_heads", "num_kv_heads"),
               ("mlp", "intermediate_size"), ("vocab", "vocab_size"))


def _check_model_on_mesh(model_config: ModelConfig, mesh, rules: tuple, rules_name: str) -> None:
  """Every dimension the rules split (parameters, Adam moments, activations, KV cache) divides by its mesh axes."""
  for logical, field in _MODEL_AXES:
    ways, axes = _axes_size(mesh, rules, logical)
    value = getattr(model_config, field)
    if value % ways:
      raise _MeshError(f"model.{field}: {value} is not divisible by {ways}, the mesh's {axes} size that "
                       f"mesh.rules={rules_name!r} splits {logical!r} over; change the model or the mesh")


def _check_batches_on_mesh(config, mesh, rollout_config, update_config) -> None:
  """Every batch of episodes splits evenly over data x fsdp (each seed's rows; the seed axis is replicated)."""
  ways = math.prod(mesh.shape[axis] for axis in sharding_lib.BATCH_AXES)
  where = f"the mesh's data x fsdp = {ways} (mesh.data={mesh.shape['data']}, mesh.fsdp={mesh.shape['fsdp']})"
  r = config.rollout
  batch = rollout_config.batch_size
  if batch % ways:
    checks.fail("rollout.num_tasks", f"the episode batch rollout.num_tasks x rollout.episodes_per_task = "
                f"{r.num_tasks} x {r.episodes_per_task} = {batch} is not divisible by {where}")
  minibatch = batch // update_config.minibatches
  if minibatch % ways:
    checks.fail("algo.minibatches", f"the minibatch of {batch} / {update_config.minibatches} = {minibatch} episodes "
                f"is not divisible by {where}")
  if config.train.eval_episodes % ways:
    checks.fail("train.eval_episodes", f"{config.train.eval_episodes} is not divisible by {where}")
  if config.sft.steps and config.sft.num_tasks % ways:
    checks.fail("sft.num_tasks", f"the SFT batch of {config.sft.num_tasks} expert episodes is not divisible by "
                f"{where}")


def _trunk_shardings(model_config: ModelConfig, mesh, rules: tuple) -> dict:
  """NamedShardings of a Transformer param tree (the policy's trunk: an SFT start, a checkpoint) under the rules."""
  return sharding_lib.shardings_from_logical(param_logical_axes(model_config), mesh, rules)


def _model_config(config, tokenizer, mesh=None, rules=None) -> tuple[ModelConfig, dict | None]:
  """The policy's ModelConfig and a checkpoint's params (None for a preset). On a mesh the model's split dimensions
  are checked against it, and a checkpoint loads straight into its shardings (each device reads its shard)."""
  m = config.model
  if m.checkpoint:
    if not os.path.isdir(m.checkpoint):
      checks.fail("model.checkpoint", f"{m.checkpoint} is not a directory (a Hugging Face safetensors checkpoint)")
    for name, plain in (("param_dtype", "float32"), ("scan_layers", False)):
      if m.get(name, plain) != plain:
        checks.fail(f"model.{name}", f"{m[name]!r}: a model.checkpoint loads in float32 with its layers one by one, "
                    f"as experiments/export_hf.py reads the run back; leave {plain!r}")
    shardings = None
    if mesh is not None:
      def shardings(model_config):
        _check_model_on_mesh(model_config, mesh, rules, config.mesh.rules)
        return _trunk_shardings(model_config, mesh, rules)
    try:
      model_config, params = hf.load_hf_checkpoint(m.checkpoint, shardings=shardings)
    except _MeshError:
      raise
    except ValueError as error:  # a damaged file: one line naming the field and the file
      raise ValueError(f"model.checkpoint: {error}") from None
    with checks.section("model"):
      # remat changes what the backward pass keeps, not the parameters.
      model_config = model_config.replace(attention_block=m.attention_block, remat=m.get("remat", False)).validate()
    if model_config.vocab_size < tokenizer.vocab_size:
      checks.fail("model.checkpoint", f"vocab_size {model_config.vocab_size} does not cover the tokenizer's "
            f"{tokenizer.vocab_size} ids")
    return model_config, params
  checks.check_choice(m.preset, "model.preset", PRESETS, hint=" (or model.checkpoint)")
  overrides = {name: m[name] for name in MODEL_FIELDS if name in m}
  vocab = -(-tokenizer.vocab_size // 64) * 64  # the tokenizer's ids, rounded up to a multiple of 64
  with checks.section("model"):
    model_config = get_config(m.preset, vocab_size=vocab, **overrides)
  if mesh is not None:
    _check_model_on_mesh(model_config, mesh, rules, config.mesh.rules)
  return model_config, None


def _update_config(config) -> train.UpdateConfig:
  a = config.algo
  with checks.section("algo"):
    checks.check_choice(a.estimator, "estimator", tuple(credit_lib.ESTIMATORS))
    checks.check_choice(a.loss, "loss", tuple(losses.POLICY_LOSSES))
    checks.check_choice(a.critic, "critic", CRITICS)
    checks.check_choice(a.whiten, "whiten", WHITEN)
    credit = credit_lib.CreditConfig(
        estimator=a.estimator, gamma=a.gamma, lam=a.lam, whiten=None if a.whiten == "none" else a.whiten,
        truncation_as_terminal=a.truncation_as_terminal, normalize_std=a.normalize_std, gigpo_omega=a.gigpo_omega)
    policy_loss = losses.PolicyLossConfig(name=a.loss, clip_low=a.clip_low, clip_high=a.clip_high,
                                          dual_clip=a.dual_clip, agg_mode=a.agg_mode)
    critic = credit_lib.critic_level(a.estimator)
    if critic is not None and a.critic == "none":
      checks.fail("critic", f"estimator {a.estimator!r} reads a critic; use 'head' or 'separate'")
    if critic is None and a.critic != "none":
      checks.fail("critic", f"estimator {a.estimator!r} reads no critic; use 'none'")
    value = ValueConfig(kind=None if a.critic == "none" else a.critic)
  with checks.section("algo", strip="update"):
    return train.UpdateConfig(
        credit=credit, policy_loss=policy_loss, value=value, value_coef=a.value_coef, value_clip=a.value_clip,
        kl_coef=a.kl_coef, kl_kind=a.kl_kind, entropy_coef=a.entropy_coef, epochs=a.epochs,
        minibatches=a.minibatches, halt_on_nonfinite=config.train.halt_on_nonfinite)


def build(config: ml_collections.ConfigDict) -> Setup:
  """Checks every field and builds the pieces; a bad field is one ValueError line naming it (nothing compiled).

  Fields left None take the environment's preset (`configs.presets`); `Setup.config` is the resolved config.
  """
  checks.check_choice(config.env.name, "env.name", JAX_ENVS + HOST_ENVS)
  config = presets.resolve(config)
  is_host = config.env.name in HOST_ENVS
  t = config.train
  iterations = checks.check_int(t.iterations, "train.iterations", 1)
  eval_every = checks.check_int(t.eval_every, "train.eval_every", 1)
  if iterations % eval_every:
    checks.fail("train.eval_every", f"{eval_every} must divide train.iterations={iterations}")
  num_seeds = checks.check_int(t.seeds, "train.seeds", 1)
  checks.check_int(t.get("seeds_at_once", 0), "train.seeds_at_once", 0)
  checks.check_int(t.seed_offset, "train.seed_offset", 0)
  checks.check_int(t.eval_episodes, "train.eval_episodes", 1)
  checks.check_int(t.task_pool, "train.task_pool", 0)
  if is_host and t.task_pool:
    checks.fail("train.task_pool", f"{t.task_pool}: a host environment trains on its own training split; use 0")
  checks.check_int(t.checkpoint_every, "train.checkpoint_every", 1)
  checks.check_int(t.keep_checkpoints, "train.keep_checkpoints", 1)
  checks.check_int(config.sft.steps, "sft.steps", 0)
  checks.check_int(config.sft.num_tasks, "sft.num_tasks", 1)
  mesh, rules = _mesh(config)
  tokenizer = _tokenizer(config)
  model_config, checkpoint_params = _model_config(config, tokenizer, mesh, rules)
  update_config = _update_config(config)
  o = config.optim
  state_dtype = o.get("state_dtype", "float32")  # a config.json from before the field
  optim_config = train.OptimConfig(
      actor_lr=o.actor_lr, critic_lr=o.critic_lr, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
      schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=o.total_steps, state_dtype=state_dtype)
  with checks.section("sft", strip="optim"):
    sft_optim_config = train.OptimConfig(actor_lr=config.sft.lr, critic_lr=0.0, state_dtype=state_dtype)
  r = config.rollout
  names = ("num_tasks", "episodes_per_task", "max_steps", "max_len", "max_action_len") + (("max_obs_len",) * is_host)
  for name in names:
    checks.check_int(r[name], f"rollout.{name}", 1)
  with checks.section("rollout"):
    rollout_config = rollout_lib.RolloutConfig(
        num_tasks=r.num_tasks, episodes_per_task=r.episodes_per_task, max_steps=r.max_steps, max_len=r.max_len,
        max_action_len=r.max_action_len, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        stop_ids=(tokenizer.end_of_step_id, tokenizer.eos_id), pad_id=tokenizer.pad_id,
        **({"max_obs_len": r.max_obs_len} if is_host else {}))
  host, env, env_params = None, None, None
  if is_host:
    with checks.section("rollout"):
      rollout_config.validate(None, model_config.vocab_size)
      if rollout_config.max_len > model_config.max_position_embeddings:
        checks.fail("max_len", f"{rollout_config.max_len} exceeds the model's max_position_embeddings "
                    f"{model_config.max_position_embeddings}")
    train.check_update_batch(update_config, rollout_config.batch_size)
    if mesh is not None:  # before the envs load their data
      _check_batches_on_mesh(config, mesh, rollout_config, update_config)
    from experiments import host_runner  # noqa: PLC0415 (it imports this module)

    host = host_runner.host_envs(config, tokenizer)
  else:
    env, env_params = _jax_env(config, tokenizer)
    train.check_env_rollout(env, rollout_config, model_config, "rollout")
    train.check_update_batch(update_config, rollout_config.batch_size)
    if mesh is not None:
      _check_batches_on_mesh(config, mesh, rollout_config, update_config)
  sft_rollout_config = dataclasses.replace(rollout_config, num_tasks=config.sft.num_tasks, episodes_per_task=1)
  sft_token_weights = entity_weights(config, env, tokenizer, model_config.vocab_size)
  seeds = tuple(range(t.seed_offset, t.seed_offset + num_seeds))
  return Setup(config=config, tokenizer=tokenizer, env=env, env_params=env_params, model_config=model_config,
               checkpoint_params=checkpoint_params, rollout_config=rollout_config, update_config=update_config,
               optim_config=optim_config, sft_optim_config=sft_optim_config, sft_rollout_config=sft_rollout_config,
               seeds=seeds, host=host, mesh=mesh, rules=rules, sft_token_weights=sft_token_weights)


def entity_weights(config, env, tokenizer, vocab_size: int) -> np.ndarray | None:
  """The SFT loss weights of `sft.entity_weight`: [V], that weight on the token of each of the environment's entity
  names (`env.entity_names`, one token each), 1 elsewhere; None at weight 1 (the plain token mean)."""
  weight = checks.check_number(config.sft.get("entity_weight", 1.0), "sft.entity_weight", lambda v: v > 0,
                               "a number > 0")
  if weight == 1.0:
    return None
  if not hasattr(env, "entity_names"):
    checks.fail("sft.entity_weight", f"{weight!r} needs an environment that names its entities (lookup_qa), not "
                f"{config.env.name!r}; use 1.0")
  weights = np.ones(vocab_size, np.float32)
  for name in env.entity_names:
    ids = tokenizer.encode(name)
    if len(ids) != 1:
      checks.fail("sft.entity_weight", f"needs one token per entity name (tokenizer=word); {config.tokenizer!r} "
                  f"spells {name!r} in {len(ids)}")
    weights[ids[0]] = weight
  return weights


# ------------------------------------------------------------------------------------------------------
# Logs.
# ------------------------------------------------------------------------------------------------------


LOGS = ("sft.jsonl", "metrics.jsonl", "eval.jsonl")


class LogWriteError(OSError):
  """A log file could not be written (a full or read-only disk); the message is one line naming it."""


def _read_jsonl(path: str, *, torn_tail: bool = False) -> list[dict]:
  """The lines of a JSONL log. torn_tail: a last line cut short by a kill or a full disk (no newline, not JSON) is
  dropped. Any other line that is not JSON is one ValueError line naming the file and the line."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  pieces = text.split("\n")
  lines = []
  for number, piece in enumerate(pieces, 1):
    if not piece.strip():
      continue
    try:
      lines.append(json.loads(piece))
    except json.JSONDecodeError as error:
      if torn_tail and number == len(pieces):  # the last piece has no newline: a write that was cut short
        continue
      checks.fail("log", f"{path} line {number} is not JSON ({error.msg}); allowed: one JSON object per line, "
                  "only the last one cut short (and only on resume)")
  return lines


def _write_text(path: str, text: str) -> None:
  """Writes (and replaces) `path` atomically: a kill leaves the old file or the new one, never a part."""
  partial = path + ".partial"
  try:
    with open(partial, "w") as f:
      f.write(text)
    os.replace(partial, path)
  except OSError as error:
    if os.path.exists(partial):
      os.remove(partial)
    raise LogWriteError(f"log: cannot write to {path}: {error.strerror or error}") from None


def _cut_jsonl(path: str, keep: Callable[[dict], bool]) -> list[dict]:
  """Rewrites a JSONL file with only the lines `keep` accepts (a resumed run drops what came after its checkpoint,
  and a last line torn by a kill), atomically: a kill during the cut leaves the file as it was."""
  lines = [line for line in _read_jsonl(path, torn_tail=True) if keep(line)]
  _write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
  return lines


def _log_gaps(metrics: list[dict], evals: list[dict], seeds, iteration: int, eval_every: int) -> str:
  """'' when the cut logs hold exactly one line per iteration (metrics) / evaluation (eval) and seed up to
  `iteration`, else what is missing or repeated."""
  problems = []
  for name, lines, expected in (("metrics.jsonl", metrics, range(1, iteration + 1)),
                                ("eval.jsonl", evals, range(0, iteration + 1, eval_every))):
    found = sorted((line["iteration"], line["seed"]) for line in lines)
    wanted = sorted((i, seed) for i in expected for seed in seeds)
    if found != wanted:
      missing, repeated = sorted(set(wanted) - set(found)), len(found) - len(set(found))
      problems.append(f"{name} has {len(found)} lines for {len(wanted)} (iteration, seed) pairs"
                      + (f", first missing {missing[0]}" if missing else "") + (f", {repeated} repeated" if repeated
                                                                                 else ""))
  return "; ".join(problems)


class Logger:
  """JSONL files, TensorBoard event files (one writer per seed) and the progress bar.

  write=False (every process but process 0 of a multi-process run): nothing is written or shown; the JSONL lines are
  kept in `kept` instead (the run's records)."""

  def __init__(self, workdir: str, seeds: tuple[int, ...], total: int, initial: int, *, tensorboard: bool,
               progress: bool, description: str, purge_step: int | None = None, write: bool = True):
    self.workdir, self.seeds, self.write = workdir, seeds, write
    self.kept: dict[str, list[dict]] = {}
    self.writers = {}
    progress = progress and write
    if tensorboard and write:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow

      # A resume hides the events a killed run wrote after its checkpoint (steps >= purge_step).
      self.writers = {seed: SummaryWriter(os.path.join(workdir, "tb", f"seed{seed}"), purge_step=purge_step)
                      for seed in seeds}
    from tqdm import tqdm

    self.bar = tqdm(total=total, initial=initial, desc=description, disable=not progress, dynamic_ncols=True,
                    unit="it")

  def jsonl(self, name: str, lines: list[dict]) -> None:
    if self.write:
      _append_jsonl(os.path.join(self.workdir, name), *lines)
    else:
      self.kept.setdefault(name, []).extend(lines)

  def scalars(self, prefix: str, seed: int, step: int, values: dict) -> None:
    writer = self.writers.get(seed)
    if writer is not None:
      for name, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          writer.add_scalar(f"{prefix}/{name}", value, step)

  def close(self) -> None:
    self.bar.close()
    for writer in self.writers.values():
      writer.close()


def _per_seed(tree: dict, index: int) -> dict:
  return {name: float(value[index]) for name, value in tree.items()}


# ------------------------------------------------------------------------------------------------------
# Programs (cached per setup so a grid reuses what it compiled).
# ------------------------------------------------------------------------------------------------------


_PROGRAMS: dict[tuple, dict[str, Callable]] = {}


def _setup_key(setup: Setup, *extra) -> tuple:
  """What a compiled program depends on: equal configs (a grid's repeated runs, a resume) reuse one compilation
  instead of tracing new closures. The environment enters through its config section and the tokenizer."""
  c = setup.config
  return (str(c.env), str(c.tokenizer), str(c.special_tokens), str(c.chat), setup.model_config,
          setup.rollout_config, setup.update_config, setup.optim_config, setup.sft_optim_config,
          setup.sft_rollout_config, c.train.eval_every, c.train.eval_episodes, c.train.task_pool,
          c.train.task_pool_seed, setup.mesh, setup.rules, *extra)


def _programs(setup: Setup, per_seed_params: bool) -> dict[str, Callable]:
  key = _setup_key(setup, per_seed_params)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _make_programs(setup, per_seed_params)
  return _PROGRAMS[key]


def _make_programs(setup: Setup, per_seed_params: bool) -> dict[str, Callable]:
  if setup.mesh is not None:
    return _make_mesh_programs(setup, per_seed_params)
  mc, env, rc = setup.model_config, setup.env, setup.rollout_config
  uc, oc = setup.update_config, setup.optim_config
  t = setup.config.train
  task_pool = train.task_pool_keys(t.task_pool_seed, t.task_pool) if t.task_pool else None
  iteration = train.make_train_iteration(mc, env, rc, uc, oc, task_pool)

  def chunk(state, env_params):
    return jax.lax.scan(lambda s, _: iteration(s, env_params), state, None, length=t.eval_every)

  def init(key, policy_params):
    return train.init_train_state(mc, uc, oc, key, policy_params)

  params_axis = 0 if per_seed_params else None
  return {
      "init": jax.jit(jax.vmap(init, in_axes=(0, params_axis))),
      "chunk": jax.jit(jax.vmap(chunk, in_axes=(0, None)), donate_argnums=0),
      "evaluate": _evaluate_program(setup),
  }


def _evaluation_key(setup: Setup) -> tuple:
  """What the held-out evaluation depends on: the environment, the model, the rollout and train.eval_episodes, not
  the method, so every method of a study shares one compiled evaluation."""
  c = setup.config
  return ("evaluate", str(c.env), str(c.tokenizer), str(c.special_tokens), str(c.chat), setup.model_config,
          setup.rollout_config, c.train.eval_episodes, c.train.eval_seed)


def _evaluate_program(setup: Setup) -> Callable:
  """The vmapped, jitted `train.make_evaluate` of `setup` (one device), kept in _PROGRAMS under `_evaluation_key`. A
  method whose policy params carry a value head is another input structure, which jit compiles apart."""
  programs = _PROGRAMS.setdefault(_evaluation_key(setup), {})
  if "evaluate" not in programs:
    evaluate = train.make_evaluate(setup.model_config, setup.env, setup.rollout_config,
                                   setup.config.train.eval_episodes)
    programs["evaluate"] = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)))
  return programs["evaluate"]


def _fresh_state(spec: state_lib.StateSpec, key, policy_params: dict | None) -> train.TrainState:
  """The TrainState `train.init_state` makes (the same values), traceable inside a sharded program: init_state's own
  jits pin the state to the first device, which a program over the mesh may not call."""
  _, init_key, rng = jax.random.split(key, 3)
  policy, critic = init_models(spec.model, spec.value, init_key, policy_params)
  params = {"policy": policy} if critic is None else {"policy": policy, train.CRITIC: critic}
  # Fresh buffers (the reference must not alias the policy: the chunk donates the state), as init_state's.
  return jax.tree.map(jnp.copy, state_lib.new_state(spec, params, state_lib.raw_key(rng)))


def _abstract(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes` placed in `shardings` (a restore target on the mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _make_mesh_programs(setup: Setup, per_seed_params: bool) -> dict[str, Callable]:
  """`_make_programs` over setup.mesh: the same vmapped init, chunk and evaluate, jitted with the stacked TrainState's
  shardings (params, Adam moments, reference, critic by the logical rules; the leading seed axis replicated) and run
  under the rules, so every `nn.with_logical_constraint` of the model splits each seed's episodes over data x fsdp.
  Keys enter as raw key data and every input is placed with `sharding.put_global`, which works across processes."""
  mesh, rules = setup.mesh, setup.rules
  mc, env, rc = setup.model_config, setup.env, setup.rollout_config
  uc, oc = setup.update_config, setup.optim_config
  t = setup.config.train
  task_pool = train.task_pool_keys(t.task_pool_seed, t.task_pool) if t.task_pool else None
  iteration = train.make_train_iteration(mc, env, rc, uc, oc, task_pool)
  evaluate = train.make_evaluate(mc, env, rc, t.eval_episodes)
  spec = state_lib.StateSpec.for_update(mc, uc, oc)  # the traced arithmetic; the shardings come from the mesh's spec
  state_shardings = sharding_lib.with_leading_axis(
      state_lib.state_shardings(state_lib.StateSpec.for_update(mc, uc, oc, mesh=mesh, rules=rules)))
  trunk = _trunk_shardings(mc, mesh, rules)
  params_shardings = sharding_lib.with_leading_axis(trunk) if per_seed_params else trunk
  replicated = sharding_lib.replicated(mesh)
  params_axis = 0 if per_seed_params else None

  def chunk(state, env_params):
    return jax.lax.scan(lambda s, _: iteration(s, env_params), state, None, length=t.eval_every)

  def init(key_data, policy_params):
    return _fresh_state(spec, jax.random.wrap_key_data(key_data), policy_params)

  def evaluate_data(policy_params, env_params, key_data):
    return evaluate(policy_params, env_params, jax.random.wrap_key_data(key_data))

  jit = functools.partial(sharding_lib.jit_with_rules, mesh=mesh, rules=rules)
  init_program = jit(jax.vmap(init, in_axes=(0, params_axis)), out_shardings=state_shardings)

  def init_state(key_data, policy_params):
    if policy_params is not None:
      policy_params = sharding_lib.put_global(policy_params, params_shardings)
    return init_program(key_data, policy_params)

  def abstract_state(key_data):
    return _abstract(jax.eval_shape(jax.vmap(init, in_axes=(0, None)), key_data, None), state_shardings)

  return {
      "init": init_state,
      "abstract": abstract_state,
      "chunk": jit(jax.vmap(chunk, in_axes=(0, None)), in_shardings=(state_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0),
      "evaluate": jit(jax.vmap(evaluate_data, in_axes=(0, None, None)),
                      in_shardings=(state_shardings.params["policy"], replicated, replicated),
                      out_shardings=replicated),
  }


def _make_mesh_sft_run(setup: Setup) -> Callable:
  """`train.make_sft_run` over setup.mesh (the same steps, chunks and callback): the stacked SFT state sharded like
  the RL state (the warm-start axis replicated), keys as raw key data. -> run(key_data, env_params, num_steps,
  policy_params, on_chunk) -> (policy params [N, ...], metrics {name: [N, num_steps]})."""
  mesh, rules = setup.mesh, setup.rules
  mc, oc = setup.model_config, setup.sft_optim_config
  spec = state_lib.StateSpec.for_sft(mc, oc)
  shardings = sharding_lib.with_leading_axis(
      state_lib.state_shardings(state_lib.StateSpec.for_sft(mc, oc, mesh=mesh, rules=rules)))
  trunk = _trunk_shardings(mc, mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  step = train.make_sft_iteration(mc, oc, setup.env, setup.sft_rollout_config, setup.sft_token_weights)
  jit = functools.partial(sharding_lib.jit_with_rules, mesh=mesh, rules=rules)
  init = jit(jax.vmap(lambda key_data, params: _fresh_state(spec, jax.random.wrap_key_data(key_data), params),
                      in_axes=(0, None)), out_shardings=shardings)
  chunks: dict[int, Callable] = {}

  def chunk_program(length: int) -> Callable:
    if length not in chunks:
      def run_chunk(state, env_params):
        return jax.lax.scan(lambda s, _: step(s, env_params), state, None, length=length)

      chunks[length] = jit(jax.vmap(run_chunk, in_axes=(0, None)), in_shardings=(shardings, replicated),
                           out_shardings=(shardings, replicated), donate_argnums=0)
    return chunks[length]

  def run(key_data, env_params, num_steps: int, policy_params=None, on_chunk=None):
    checks.check_int(num_steps, "sft.steps", 1)
    if policy_params is not None:
      policy_params = sharding_lib.put_global(policy_params, trunk)
    return sft_lib.run_chunks(init(key_data, policy_params), chunk_program, env_params, num_steps, SFT_CHUNK,
                              on_chunk)

  run.first = jit(lambda params: jax.tree.map(lambda x: x[0], params), out_shardings=trunk)
  return run


SFT_CHUNK = 50


def sft_keys(setup: Setup) -> jax.Array:
  """The SFT warm start's key of every seed, [seeds] (warm_start takes the first alone without sft.per_seed)."""
  return jnp.stack([jax.random.fold_in(jax.random.key(seed), 0) for seed in setup.seeds])


def warm_start(setup: Setup, *, progress: bool = True, log: Callable[[dict], None] | None = None):
  """The SFT start of `setup` (`train.make_sft_run`): Transformer params, one set for every seed ([seeds, ...] stacked
  with `sft.per_seed`), or `model.checkpoint`'s params (None: a random init) when sft.steps == 0. log(line) gets one
  line per SFT step (metrics averaged over the warm starts)."""
  config = setup.config
  steps = config.sft.steps
  if steps == 0:
    return setup.checkpoint_params
  if setup.host is not None:
    from experiments import host_runner  # noqa: PLC0415

    starts = [host_runner.warm_start(setup, seed, progress=progress, log=log) for seed in
              (setup.seeds if config.sft.per_seed else setup.seeds[:1])]
    return jax.tree.map(lambda *x: jnp.stack(x), *starts) if config.sft.per_seed else starts[0]
  programs = _PROGRAMS.setdefault(_setup_key(setup, "sft", config.sft.get("entity_weight", 1.0)), {})
  if "run" not in programs:
    if setup.mesh is None:
      programs["run"] = train.make_sft_run(setup.model_config, setup.sft_optim_config, setup.env,
                                           setup.sft_rollout_config, chunk_size=SFT_CHUNK,
                                           token_weights=setup.sft_token_weights)
    else:
      programs["run"] = _make_mesh_sft_run(setup)
  keys = sft_keys(setup)
  if not config.sft.per_seed:
    keys = keys[:1]
  env_params = setup.env_params
  if setup.mesh is not None:
    # Every process runs the warm start; only process 0 shows it and logs it.
    replicated = sharding_lib.replicated(setup.mesh)
    keys = sharding_lib.put_global(np.asarray(jax.random.key_data(keys)), replicated)
    env_params = sharding_lib.put_global(env_params, replicated)
    if not sharding_lib.is_primary():
      progress, log = False, None
  from tqdm import tqdm

  bar = tqdm(total=steps, desc="sft", disable=not progress, dynamic_ncols=True, unit="step")

  def on_chunk(done: int, metrics: dict, params: dict) -> None:
    del params
    length = next(iter(metrics.values())).shape[1]
    for k in range(length):
      if log is not None:
        log({"step": done - length + k + 1, **{name: float(np.mean(value[:, k])) for name, value in metrics.items()}})
    bar.update(length)
    train.check_halt(metrics, config.train.halt_on_nonfinite, field="sft", flag="train.halt_on_nonfinite")
    bar.set_postfix(nll=f"{float(np.mean(metrics['nll'][:, -1])):.3f}",
                    acc=f"{float(np.mean(metrics['token_accuracy'][:, -1])):.3f}")

  params, _ = programs["run"](keys, env_params, steps, setup.checkpoint_params, on_chunk)
  bar.close()
  if config.sft.per_seed:
    return params
  return jax.tree.map(lambda x: x[0], params) if setup.mesh is None else programs["run"].first(params)


# ------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------


def _eval_lines(metrics: dict, seeds, iteration: int, env_steps: np.ndarray) -> list[dict]:
  return [{"iteration": iteration, "seed": seed, "env_steps": int(env_steps[i]), **_per_seed(metrics, i)}
          for i, seed in enumerate(seeds)]


def records_from_eval(method: str, eval_lines: list[dict]) -> list[dict]:
  """eval.jsonl lines -> the per-seed records of `experiments.report`."""
  records = {}
  for line in sorted(eval_lines, key=lambda line: (line["seed"], line["iteration"])):
    record = records.setdefault(line["seed"], {"method": method, "seed": line["seed"], "env_steps": [],
                                               "success": [], "success_sampled": []})
    record["env_steps"].append(line["env_steps"])
    record["success"].append(line["success"])
    record["success_sampled"].append(line["success_sampled"])
  return list(records.values())


def run(config: ml_collections.ConfigDict, workdir: str, *, resume: bool = False, sft_params: Any = None,
        setup: Setup | None = None, print_fn: Callable[[str], None] = print) -> dict:
  """Trains `config` in `workdir`; see the module docstring. Returns {"records": per-seed held-out curves (the
  `experiments.report` format), "final": the last evaluation per seed, "table": the summary table (markdown),
  "state": the final TrainState (stacked over seeds; a tuple of such states, one per group of train.seeds_at_once
  seeds, when they run in turn; a tuple of per-seed states for a host environment)}.

  sft_params: a warm start computed elsewhere (an ablation shares one per seed across methods); None runs the
  configured SFT. resume: continue from the newest usable checkpoint in workdir/checkpoints (a missing or empty
  directory, or no readable checkpoint, is a one-line FileNotFoundError, raised before anything compiles); without
  it the run starts over in workdir (`_start_over`).

  train.seeds_at_once = n (0: all): the seeds run in groups of n, one group after another, each group's seeds vmapped
  in one program as all of them are otherwise: for a mesh without room for every seed's state at once. Each group
  has its checkpoints in checkpoints/seeds<first>-<last>, holding its starting state (step 0) from the beginning, so
  a resume continues every group where it stopped; the logs are the same files, with the same lines.
  """
  setup = build(config) if setup is None else setup
  if setup.host is not None:
    from experiments import host_runner  # noqa: PLC0415

    return host_runner.run(setup, workdir, resume=resume, sft_params=sft_params, print_fn=print_fn)
  config = setup.config  # presets resolved: config.json records what ran
  t, name = config.train, config.name
  mesh = setup.mesh
  # On a mesh every process runs this same function (SPMD); only process 0 writes logs and prints. Every process
  # takes part in each checkpoint save and restore (orbax's multi-process path: each writes its shards).
  primary = mesh is None or sharding_lib.is_primary()
  if not primary:
    print_fn = lambda _: None  # noqa: E731
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  groups = seed_groups(setup)
  group_dirs = [checkpoint_dir] if len(groups) == 1 else [
      os.path.join(checkpoint_dir, f"seeds{group[0]}-{group[-1]}") for group in groups]
  if resume:
    if not os.path.isdir(checkpoint_dir):
      raise FileNotFoundError(f"checkpoint.directory: {checkpoint_dir} does not exist (nothing to resume)")
    for directory in group_dirs:
      checkpoint_lib.checkpoint_steps(directory)  # raises when no complete checkpoint is there
  elif primary:
    _start_over(workdir, checkpoint_dir)
  if primary:
    _write_text(os.path.join(workdir, "config.json"), config.to_json(indent=1))
  if mesh is not None:
    sharding_lib.sync_processes("stepjax.runner.start")  # the others open the checkpoints once they are started over
  if not resume and sft_params is None:
    sft_params = warm_start(setup, progress=config.log.progress,
                            log=lambda line: _append_jsonl(os.path.join(workdir, "sft.jsonl"), line))
  per_seed = sft_params is not None and _is_stacked(sft_params, setup)

  if len(groups) == 1:
    state, evals = _train_seeds(setup, workdir, checkpoint_dir, resume=resume, sft_params=sft_params,
                                per_seed=per_seed, primary=primary, print_fn=print_fn)
  else:
    if not resume:  # every group's starting state first: a resume can then start any group without the warm start
      for group, directory in zip(groups, group_dirs):
        start = sft_params
        if per_seed:
          first = setup.seeds.index(group[0])
          start = jax.tree.map(lambda x: x[first:first + len(group)], sft_params)  # noqa: B023
        _save_start(dataclasses.replace(setup, seeds=group), directory, start, per_seed)
    state, evals = [], []
    for group, directory in zip(groups, group_dirs):
      group_state, group_evals = _train_seeds(dataclasses.replace(setup, seeds=group), workdir, directory,
                                              resume=True, sft_params=None, per_seed=per_seed, primary=primary,
                                              print_fn=print_fn)
      state.append(group_state)
      evals += group_evals
    state = tuple(state)

  eval_lines = _read_jsonl(os.path.join(workdir, "eval.jsonl")) if primary else evals
  records = records_from_eval(name, eval_lines)
  table = _summary(name, records, eval_lines, print_fn)
  return {"records": records, "final": [line for line in eval_lines if line["iteration"] == t.iterations],
          "table": table, "state": state}


def seed_groups(setup: Setup) -> list[tuple[int, ...]]:
  """The seeds in the groups that run one after another (train.seeds_at_once; 0 = all in one group)."""
  n = setup.config.train.get("seeds_at_once", 0) or len(setup.seeds)
  return [setup.seeds[i:i + n] for i in range(0, len(setup.seeds), n)]


def _keys_and_eval_key(setup: Setup):
  """The seeds' stacked state keys, the held-out key and the env params, replicated over the mesh if there is one."""
  keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), 1) for seed in setup.seeds])
  eval_key = jax.random.key(setup.config.train.eval_seed)
  env_params = setup.env_params
  if setup.mesh is not None:
    replicated = sharding_lib.replicated(setup.mesh)
    keys = sharding_lib.put_global(np.asarray(jax.random.key_data(keys)), replicated)
    eval_key = sharding_lib.put_global(np.asarray(jax.random.key_data(eval_key)), replicated)
    env_params = sharding_lib.put_global(env_params, replicated)
  return keys, eval_key, env_params


def _save_start(setup: Setup, directory: str, sft_params: Any, per_seed: bool) -> None:
  """Checkpoint 0 of a group of seeds: their starting TrainState (from `sft_params`, or a random init)."""
  keys, _, _ = _keys_and_eval_key(setup)
  manager = train.make_checkpoint_manager(directory, max_to_keep=setup.config.train.keep_checkpoints)
  try:
    train.save_checkpoint(manager, _programs(setup, per_seed)["init"](keys, sft_params), 0,
                          {"iteration": 0, "env_steps": [0] * len(setup.seeds), "name": setup.config.name})
  finally:
    checkpoint_lib.finish_saves(manager)


def _train_seeds(setup: Setup, workdir: str, checkpoint_dir: str, *, resume: bool, sft_params: Any, per_seed: bool,
                 primary: bool, print_fn: Callable[[str], None]) -> tuple[Any, list[dict]]:
  """RL for setup.seeds in one vmapped program, from `sft_params` or (resume) the newest usable checkpoint in
  checkpoint_dir, to train.iterations, appending to workdir's logs (only the lines of these seeds are cut on a
  resume). -> (the final stacked TrainState, these seeds' evaluation lines when this process writes no logs)."""
  config = setup.config
  t, name = config.train, config.name
  seeds = setup.seeds
  keys, eval_key, env_params = _keys_and_eval_key(setup)
  programs = _programs(setup, per_seed)

  earlier_evals = []  # a resumed run's evaluations before it (the records of a process that writes no logs)
  if resume:
    # The warm start is inside the checkpoint; a random init has the same shapes.
    abstract = jax.eval_shape(programs["init"], keys, None) if setup.mesh is None else programs["abstract"](keys)
    state, iteration, extra = checkpoint_lib.restore_usable_checkpoint(checkpoint_dir, abstract, print_fn=print_fn)
    env_steps = np.asarray(extra["env_steps"], np.int64)
    kept = lambda line: line["seed"] not in seeds or line["iteration"] <= iteration  # noqa: E731
    ours = lambda lines: [line for line in lines if line["seed"] in seeds]  # noqa: E731
    if primary:
      metrics = _cut_jsonl(os.path.join(workdir, "metrics.jsonl"), kept)
      evals = _cut_jsonl(os.path.join(workdir, "eval.jsonl"), kept)
      gaps = _log_gaps(ours(metrics), ours(evals), seeds, iteration, t.eval_every)
      if gaps:
        print_fn(f"resume: the logs in {workdir} do not match checkpoint {iteration}: {gaps}")
    else:  # process 0 cuts the file (atomically); what lies beyond the checkpoint is left out either way
      evals = [line for line in _read_jsonl(os.path.join(workdir, "eval.jsonl"), torn_tail=True) if kept(line)]
    earlier_evals = ours(evals)
  else:
    state = programs["init"](keys, sft_params)
    iteration, env_steps = 0, np.zeros(len(seeds), np.int64)

  logger = Logger(workdir, seeds, t.iterations, iteration, tensorboard=config.log.tensorboard,
                  progress=config.log.progress, description=name, purge_step=iteration + 1 if resume else None,
                  write=primary)
  try:
    manager = train.make_checkpoint_manager(checkpoint_dir, max_to_keep=t.keep_checkpoints)
  except BaseException:
    logger.close()
    raise
  try:
    if iteration == 0 and not any(line["iteration"] == 0 for line in earlier_evals):  # the start's evaluation
      _evaluate(programs, state, setup, env_params, eval_key, iteration, env_steps, logger,
                start=sft_params if setup.mesh is None else None)
    chunks_done = iteration // t.eval_every
    while iteration < t.iterations:
      start = time.perf_counter()
      state, metrics = programs["chunk"](state, env_params)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - start
      lines = []
      agent_steps = metrics["agent_steps"].sum()
      for k in range(t.eval_every):
        for i, seed in enumerate(seeds):
          env_steps[i] += int(metrics["agent_steps"][i, k])
          values = {key: float(value[i, k]) for key, value in metrics.items()}
          lines.append({"iteration": iteration + k + 1, "seed": seed, "env_steps": int(env_steps[i]), **values,
                        "time_s": elapsed / t.eval_every})
          logger.scalars("train", seed, iteration + k + 1, values)
      lines[-1]["agent_steps_per_s"] = float(agent_steps / elapsed)
      lines[-1]["tokens_per_s"] = float(metrics["action_tokens"].sum() / elapsed)
      logger.jsonl("metrics.jsonl", lines)
      iteration += t.eval_every
      chunks_done += 1
      skipped = int(metrics["skipped"].sum())
      if t.halt_on_nonfinite and skipped:
        raise FloatingPointError(f"train: {skipped} minibatch update(s) had a non-finite loss or gradient "
                                 "(train.halt_on_nonfinite=True)")
      evaluation = _evaluate(programs, state, setup, env_params, eval_key, iteration, env_steps, logger)
      if chunks_done % t.checkpoint_every == 0 or iteration == t.iterations:
        started = train.save_checkpoint(manager, state, iteration, {"iteration": iteration,
                                                                    "env_steps": env_steps.tolist(), "name": name})
        if not started:  # orbax skips a step at or below one already in the directory: never resume into that
          raise checkpoint_lib.CheckpointWriteError(
              f"checkpoint: step {iteration} was not saved: {checkpoint_dir} already holds a later checkpoint")
      logger.bar.update(t.eval_every)
      logger.bar.set_postfix(success=f"{metrics['success_rate'][:, -1].mean():.3f}",
                             ret=f"{metrics['return_mean'][:, -1].mean():.3f}",
                             kl=f"{metrics['approx_kl'][:, -1].mean():.2e}",
                             clip=f"{metrics['clip_frac'][:, -1].mean():.3f}",
                             eval=f"{np.mean(evaluation['success']):.3f}",
                             steps_s=f"{agent_steps / elapsed:.0f}",
                             tok_s=f"{metrics['action_tokens'].sum() / elapsed:.0f}")
  finally:
    try:
      checkpoint_lib.finish_saves(manager)  # a failed asynchronous save is one CheckpointWriteError line
    finally:
      logger.close()

  return state, earlier_evals + logger.kept.get("eval.jsonl", [])


def _append_jsonl(path: str, *lines: dict) -> None:
  """Appends lines to a JSONL log; a failed write (a full disk) is one LogWriteError line (a torn last line that
  it may leave is dropped by the next resume)."""
  try:
    with open(path, "a") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  except OSError as error:
    raise LogWriteError(f"log: cannot write to {path}: {error.strerror or error}") from None


def _start_over(workdir: str, checkpoint_dir: str) -> None:
  """A run without resume in a used workdir starts over. An earlier (killed) run's checkpoints go first, else orbax
  would skip saving the steps the old run reached and a later resume would restore the old run: each step directory
  is renamed aside in one step, then deleted (a kill leaves only complete steps), and the directory itself stays (it
  may be a mount or a link). Only then the logs are emptied, so a kill in between leaves the old run resumable."""
  if os.path.isdir(checkpoint_dir):
    for name in os.listdir(checkpoint_dir):
      if name.isdigit() or re.fullmatch(r"seeds\d+-\d+", name):  # a step, or a group of seeds' directory
        aside = os.path.join(checkpoint_dir, name + ".discarded")
        shutil.rmtree(aside, ignore_errors=True)  # left by a start-over that was killed
        os.replace(os.path.join(checkpoint_dir, name), aside)
    _empty_dir(checkpoint_dir)
  _empty_dir(os.path.join(workdir, "tb"))
  for log_name in LOGS:
    _write_text(os.path.join(workdir, log_name), "")


def _empty_dir(path: str) -> None:
  if os.path.isdir(path):
    for name in os.listdir(path):
      entry = os.path.join(path, name)
      if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry)
      else:
        os.remove(entry)


def _is_stacked(params: dict, setup: Setup) -> bool:
  """Whether SFT params carry a leading seed axis (`sft.per_seed`)."""
  embed = jax.tree.leaves(params)[0]
  single = jax.tree.leaves(jax.eval_shape(lambda: train.init_sft_state(setup.model_config, setup.sft_optim_config,
                                                                       jax.random.key(0)).params["policy"]))[0]
  return embed.ndim == single.ndim + 1


def _evaluate(programs, state, setup: Setup, env_params, eval_key, iteration: int, env_steps: np.ndarray,
              logger: Logger, start: Any = None) -> dict:
  """Evaluates the policy of `state` held out and logs it. start: the SFT params the state began from (the start's
  evaluation): the methods of a study share one start, so its evaluation is computed once and reused while the same
  params object is passed in (the same params, program and key give the same numbers)."""
  memo = _PROGRAMS.setdefault(_evaluation_key(setup) + (setup.seeds,), {}) if start is not None else {}
  if memo.get("start") is start and start is not None:
    metrics = memo["metrics"]
  else:
    metrics = jax.device_get(programs["evaluate"](state.params["policy"], env_params, eval_key))
    if start is not None:
      memo.update(start=start, metrics=metrics)
  lines = _eval_lines(metrics, setup.seeds, iteration, env_steps)
  logger.jsonl("eval.jsonl", lines)
  for line in lines:
    logger.scalars("eval", line["seed"], iteration, {k: v for k, v in line.items() if k not in ("iteration", "seed")})
  return metrics


def _summary(name: str, records: list[dict], eval_lines: list[dict], print_fn) -> str:
  last = max(line["iteration"] for line in eval_lines)
  rows = [f"| {line['seed']} | {line['success']:.3f} | {line['success_sampled']:.3f} | {line['return']:.3f} | "
          f"{line['episode_steps']:.2f} |" for line in eval_lines if line["iteration"] == last]
  per_seed = "\n".join([f"held-out evaluation of {name!r} after {last} iterations:",
                        "| seed | success (greedy) | success (sampled) | return | steps |",
                        "|---|---|---|---|---|", *rows])
  table = report.format_table(report.summarize(records))
  print_fn(per_seed + "\n\n" + table)
  return table
