"""Whole runs, PureJaxRL-style: rollout + update as pure functions, scanned over iterations, vmapped over seeds.

  `make_train_iteration`       one RL iteration on a JAX environment (rollout with the current policy, then the
                               update of `make_update`), as one pure function;
  `make_train`                 init + a `lax.scan` over iterations: `train(key, env_params, policy_params)`; jit
                               once, vmap over seeds;
  `make_evaluate`              held-out episodes, greedy and sampled, on the same tasks;
  `make_host_train_iteration`  host environments (TextWorld, any `envs.host.HostEnv`): a Python loop around the same
                               jitted pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from stepjax import checks
from stepjax import rollout as rollout_lib
from stepjax.models.transformer import ModelConfig, Transformer
from stepjax.train.config import OptimConfig, UpdateConfig, check_update_batch
from stepjax.train.state import StateSpec, TrainState, init_state, policy_trunk, raw_key
from stepjax.train.update import as_float32, check_halt, make_update, update_step
from stepjax.types import EpisodeBatch

Array = Any


def rollout_metrics(batch: EpisodeBatch, info: Any) -> dict:
  """Per-batch rollout statistics (float32 scalars) from an EpisodeBatch and its `rollout.RolloutInfo`.

  success_rate (episodes the environment scored as solved), return_mean (undiscounted), episode_steps (mean steps
  per episode), invalid_rate (steps whose action parsed as no command, over all steps), terminated_frac,
  truncated_frac, context_len (mean tokens per row), tokens_per_step (mean action tokens per step), agent_steps and
  action_tokens (totals: what steps/s and tokens/s count).
  """
  steps = batch.num_steps()
  total_steps = jnp.sum(steps)
  return as_float32({
      "success_rate": jnp.mean(info.success),
      "return_mean": jnp.mean(batch.episode_returns()),
      "episode_steps": jnp.mean(steps),
      "invalid_rate": jnp.sum(info.invalid_steps) / jnp.maximum(total_steps, 1),
      "terminated_frac": jnp.mean(batch.terminated),
      "truncated_frac": jnp.mean(batch.truncated),
      "context_len": jnp.mean(batch.seq_len),
      "tokens_per_step": jnp.sum(batch.action_mask) / jnp.maximum(total_steps, 1),
      "agent_steps": total_steps,
      "action_tokens": jnp.sum(batch.action_mask),
  })


def host_rollout_metrics(batch: EpisodeBatch, info: Any) -> dict:
  """`rollout_metrics` of a host rollout (`rollout.HostRolloutInfo`) plus the mean of each per-episode number the
  envs reported (`HostRolloutInfo.env_metrics`: em, f1, searches for search_qa), under the same names."""
  metrics = rollout_metrics(batch, info)
  for name, values in (getattr(info, "env_metrics", None) or {}).items():
    metrics[name] = jnp.mean(jnp.asarray(values, jnp.float32))
  return metrics


def check_env_rollout(env, rollout_config, model_config: ModelConfig, field: str) -> None:
  """One line before anything compiles: the rollout must fit the model and the environment. `field` is the config
  section the rollout settings come from ("rollout", "eval.rollout", "sft.rollout")."""
  with checks.section(field):
    rollout_config.validate(env.max_obs_len, model_config.vocab_size)
    if rollout_config.max_len > model_config.max_position_embeddings:
      checks.fail("max_len", f"{rollout_config.max_len} exceeds the model's max_position_embeddings "
                  f"{model_config.max_position_embeddings}")


def task_pool_keys(pool_seed: int, pool_size: int) -> Array:
  """[pool_size] reset keys of a fixed pool of training tasks (a training set of questions, as in LLM RL)."""
  checks.check_int(pool_size, "train.task_pool", 1)
  return jax.random.split(jax.random.fold_in(jax.random.key(pool_seed), 0x7A5C), pool_size)


def make_train_iteration(model_config: ModelConfig, env, rollout_config, update_config: UpdateConfig,
                         optim_config: OptimConfig, task_pool: Array | None = None
                         ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """-> `iteration(state, env_params) -> (state, metrics)`: one pure (un-jitted) RL iteration on a JAX environment.

  It samples `rollout_config.batch_size` episodes with the current policy (the rollout key is split off
  `state.rng`), then runs the update of `make_update` (critic values and reference log-probs, credit, epochs x
  minibatches) on them. metrics: `make_update`'s plus `rollout_metrics`'. Pure: scan it, jit it, vmap it over seeds.
  task_pool: [P] reset keys (`task_pool_keys`); each iteration then draws its num_tasks tasks from this fixed pool
  (without replacement when P >= num_tasks) instead of fresh random tasks.
  """
  spec = StateSpec.for_update(model_config, update_config, optim_config)
  check_env_rollout(env, rollout_config, model_config, "rollout")
  check_update_batch(update_config, rollout_config.batch_size)
  sample = rollout_lib.make_rollout(Transformer(model_config), env, rollout_config)
  num_tasks = rollout_config.num_tasks

  def draw_tasks(key):
    if task_pool is None:
      return None
    pool_size = task_pool.shape[0]
    index = jax.random.choice(key, pool_size, (num_tasks,), replace=pool_size < num_tasks)
    return task_pool[index]

  def iteration(state: TrainState, env_params: Any) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    tasks = draw_tasks(jax.random.fold_in(rollout_key, 1))
    batch, info = sample(policy_trunk(state.params["policy"]), env_params, rollout_key, 0, tasks)
    state, metrics = update_step(spec, update_config, state.replace(rng=raw_key(rng)), batch)
    return state, {**metrics, **rollout_metrics(batch, info)}

  return iteration


def make_host_train_iteration(model_config: ModelConfig, rollout_config, tokenizer, update_config: UpdateConfig,
                              optim_config: OptimConfig, *, mesh=None, rules=None,
                              compiler_options: Mapping[str, Any] | None = None) -> Callable:
  """-> `iteration(state, pool, seeds, group_ids=None, timings=None) -> (state, metrics)` for host environments
  (TextWorld, any `envs.host.HostEnv`): the host loop around the same jitted pieces. One call rolls out one episode
  per env of `pool` (`rollout.make_host_rollout`, reset with `seeds`; the rollout key is split off `state.rng` as in
  `make_train_iteration`), then runs `make_update` on the batch. metrics (host floats): the update's plus
  `host_rollout_metrics`' (em / f1 / searches when the envs report them). timings: a dict that accumulates the
  rollout's seconds per phase ("act", "env", "observe"). With update.halt_on_nonfinite a skipped minibatch raises
  (`check_halt`).

  With `mesh` and `rules`: the state lives in its shardings (`state.state_shardings`: pass one made there, e.g. by a
  jitted init with those out_shardings, or let the update place it), the rollout's jitted pieces run on it under the
  rules with the host arrays over data x fsdp (`make_host_rollout`'s mesh), and the update places the assembled
  batch over data x fsdp itself (`make_update`'s mesh). With several processes each steps its share of the rows
  (`sharding.process_rows`): `pool`, `seeds` and `group_ids` are that share's (`make_host_rollout`).
  """
  update_config.validate()
  host_rollout = rollout_lib.make_host_rollout(Transformer(model_config), rollout_config, tokenizer, mesh=mesh,
                                               rules=rules)
  update = make_update(model_config, update_config, optim_config, mesh=mesh, rules=rules,
                       compiler_options=compiler_options)

  def iteration(state: TrainState, pool, seeds, group_ids=None, timings: dict | None = None
                ) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    batch, info = host_rollout(policy_trunk(state.params["policy"]), pool, seeds, rollout_key, group_ids, timings)
    state, metrics = update(state.replace(rng=raw_key(rng)), batch)
    metrics = {name: float(value) for name, value in
               jax.device_get({**metrics, **host_rollout_metrics(batch, info)}).items()}
    check_halt(metrics, update_config)
    return state, metrics

  return iteration


def make_train(model_config: ModelConfig, env, rollout_config, update_config: UpdateConfig,
               optim_config: OptimConfig, num_iterations: int, task_pool: Array | None = None) -> Callable:
  """-> `train(key, env_params, policy_params=None) -> (state, metrics)`, PureJaxRL-style: one pure function that
  initialises a TrainState (from `policy_params`, e.g. an SFT warm start, else random) and runs `num_iterations`
  of `make_train_iteration` (with its `task_pool`) in a `lax.scan`. metrics: each iteration's, stacked to
  [num_iterations].

  Jit it once; `jax.vmap(train, in_axes=(0, None, None))(keys, env_params, policy_params)` trains one run per seed
  in one program (in_axes 0 for per-seed policy_params).
  """
  checks.check_int(num_iterations, "train.num_iterations", 1)
  spec = StateSpec.for_update(model_config, update_config, optim_config)
  iteration = make_train_iteration(model_config, env, rollout_config, update_config, optim_config, task_pool)

  def train(key: Array, env_params: Any, policy_params: dict | None = None) -> tuple[TrainState, dict]:
    state = init_state(spec, key, policy_params)
    return jax.lax.scan(lambda state, _: iteration(state, env_params), state, None, length=num_iterations)

  return train


def make_evaluate(model_config: ModelConfig, env, rollout_config, num_episodes: int) -> Callable:
  """-> `evaluate(policy_params, env_params, key) -> metrics`: `num_episodes` held-out episodes, greedy and sampled.

  Pass a key that training never uses (e.g. `jax.random.key(eval_seed)`, fixed for a whole study) so every run and
  method is scored on the same held-out tasks; or task_keys [num_episodes] to score given tasks (e.g. the
  training pool). policy_params may carry a value head (ignored). metrics (float32):
  success (greedy), success_sampled, return (greedy), return_sampled, episode_steps (greedy),
  invalid_rate (greedy).
  """
  checks.check_int(num_episodes, "eval.num_episodes", 1)
  config = dataclasses.replace(rollout_config, num_tasks=num_episodes, episodes_per_task=1)
  check_env_rollout(env, config, model_config, "eval.rollout")
  model = Transformer(model_config)
  greedy = rollout_lib.make_rollout(model, env, dataclasses.replace(config, greedy=True))
  sampled = rollout_lib.make_rollout(model, env, dataclasses.replace(config, greedy=False))

  def evaluate(policy_params: dict, env_params: Any, key: Array, task_keys: Array | None = None) -> dict:
    params = policy_trunk(policy_params)
    # One key for both: the same held-out tasks (the reset keys come from the rollout key's first split).
    greedy_metrics = rollout_metrics(*greedy(params, env_params, key, 0, task_keys))
    sampled_metrics = rollout_metrics(*sampled(params, env_params, key, 0, task_keys))
    return {"success": greedy_metrics["success_rate"], "success_sampled": sampled_metrics["success_rate"],
            "return": greedy_metrics["return_mean"], "return_sampled": sampled_metrics["return_mean"],
            "episode_steps": greedy_metrics["episode_steps"], "invalid_rate": greedy_metrics["invalid_rate"]}

  return evaluate
