"""Supervised warm start (behaviour cloning on action tokens).

Three layers, one driver:

  `make_sft_update(...) -> update(state, batch)`  one jitted AdamW step on given episodes (e.g. a dataset's);
  `make_sft_iteration(...) -> step(state, env_params)`  one pure step on a fresh batch of scripted-expert episodes;
  `make_sft_run(...) -> run(keys, env_params, num_steps)`  the warm start itself: one run per key (`vmap`), in
            jitted chunks of `lax.scan` over `make_sft_iteration`, with a callback after every chunk (progress,
            logs). The experiment runner, the notebooks and the tests all warm-start through it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from stepjax import checks
from stepjax import losses
from stepjax import rollout as rollout_lib
from stepjax import segments
from stepjax import sharding as sharding_lib
from stepjax.models.transformer import ModelConfig, Transformer
from stepjax.train.config import OptimConfig
from stepjax.train.loop import check_env_rollout
from stepjax.train.optim import make_optimizer
from stepjax.train.state import StateSpec, TrainState, init_state, raw_key, state_shardings
from stepjax.train.update import as_float32, guarded_step
from stepjax.types import EpisodeBatch

Array = Any


def sft_loss(logits: Array, batch: EpisodeBatch, token_weights: Array | None = None) -> tuple[Array, dict]:
  """Cross-entropy on action tokens only. logits [B, L, V] (position p predicts token p + 1) -> (loss [], metrics).

  Prompt, observation and padding tokens carry no loss: their targets do not reach the loss or its gradient.
  token_weights: None (every action token counts once: the token mean) or [V] non-negative weights by target token
  id: the loss is then the weighted mean over action tokens, sum(w * nll) / sum(w) (e.g. the few entity tokens an
  episode copies from its context weighted above the think text around them). metrics: nll and token_accuracy
  are the unweighted token means either way.
  """
  logp = losses.shifted_logprobs(logits, batch.tokens)
  nll = -losses.aggregate(logp, batch.action_mask, mode="token-mean")
  loss = nll
  if token_weights is not None:
    weights = jnp.asarray(token_weights, logp.dtype)[batch.tokens] * batch.action_mask
    loss = -jnp.sum(weights * logp) / jnp.maximum(jnp.sum(weights), 1e-8)
  predicted = jnp.pad(jnp.argmax(logits[:, :-1], axis=-1), ((0, 0), (1, 0)))
  accuracy = segments.masked_mean(predicted == batch.tokens, batch.action_mask)
  return loss, {"nll": jax.lax.stop_gradient(nll), "token_accuracy": accuracy}


def _sft_step(spec: StateSpec, state: TrainState, batch: EpisodeBatch,
              token_weights: Array | None = None) -> tuple[TrainState, dict]:
  module = Transformer(spec.model)

  def loss_fn(params, batch):
    logits, _, _ = module.apply({"params": params["policy"]}, batch.tokens)
    return sft_loss(logits, batch, token_weights)

  params, opt_state, finite, loss, grad_norm, metrics = guarded_step(make_optimizer(spec.optim), loss_fn,
                                                                     state.params, state.opt_state, batch)
  skipped_updates = state.skipped_updates + (~finite).astype(jnp.int32)
  metrics.update(loss=loss, grad_norm=grad_norm, skipped=~finite, skipped_updates=skipped_updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_updates=skipped_updates)
  return new_state, as_float32(metrics)


@functools.lru_cache(maxsize=16)
def _sft_program(spec: StateSpec) -> Callable:
  fn = functools.partial(_sft_step, spec)
  if spec.mesh is None:
    return spec.jit(fn, donate_argnums=0)
  shardings = state_shardings(spec)
  return spec.jit(fn, in_shardings=(shardings, spec.rows()), out_shardings=(shardings, spec.replicated()),
                  donate_argnums=0)


def make_sft_update(model_config: ModelConfig, optim_config: OptimConfig, *, mesh=None, rules=None,
                    compiler_options: Mapping[str, Any] | None = None
                    ) -> Callable[[TrainState, EpisodeBatch], tuple[TrainState, dict]]:
  """-> `update(state, batch) -> (state, metrics)`: one AdamW step (actor_lr) on `sft_loss`; the state is donated.

  state: from `init_sft_state`. metrics: loss (= nll), nll, token_accuracy, grad_norm, skipped, skipped_updates;
  a non-finite loss or gradient skips the step (params and optimizer state bit-identical), as in `make_update`
  (mesh, rules, compiler_options as there); `check_halt(metrics, halt, field="sft")` halts on a skip. SFT reads no
  rewards: a batch with NaN rewards trains as usual.
  """
  spec = StateSpec.for_sft(model_config, optim_config, mesh=mesh, rules=rules, compiler_options=compiler_options)
  step = _sft_program(spec)
  shardings = None if mesh is None else state_shardings(spec)

  def update(state: TrainState, batch: EpisodeBatch) -> tuple[TrainState, dict]:
    if set(state.params) != {"policy"} or "value_head" in state.params["policy"]:
      checks.fail("sft.state", "expected a policy-only TrainState from init_sft_state (params = {'policy': "
                  "Transformer params}); add a value head or critic afterwards with init_train_state(..., "
                  "policy_params=...)")
    if mesh is not None:
      sharding_lib.check_batch_divisible(batch.batch_size, mesh, "batch_size")
      state = jax.device_put(state, shardings)
      batch = jax.device_put(batch, sharding_lib.batch_shardings(batch, mesh))
    return step(state, batch)

  update.state_shardings = shardings
  return update


def make_sft_iteration(model_config: ModelConfig, optim_config: OptimConfig, env, rollout_config,
                       token_weights: Any = None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """-> `step(state, env_params) -> (state, metrics)`: one pure SFT step on a fresh batch of scripted-expert
  episodes (the rollout key is split off `state.rng`). state: from `init_sft_state`. metrics: `make_sft_update`'s.
  token_weights: None or [V] loss weights by token id (`sft_loss`)."""
  spec = StateSpec.for_sft(model_config, optim_config)
  check_env_rollout(env, rollout_config, model_config, "sft.rollout")
  if token_weights is not None:
    token_weights = check_token_weights(token_weights, model_config.vocab_size)
  expert = rollout_lib.make_rollout(Transformer(model_config), env, rollout_config, actor="expert")

  def step(state: TrainState, env_params: Any) -> tuple[TrainState, dict]:
    rng, rollout_key = jax.random.split(state.key)
    batch, _ = expert(state.params["policy"], env_params, rollout_key)
    return _sft_step(spec, state.replace(rng=raw_key(rng)), batch, token_weights)

  return step


def check_token_weights(token_weights: Any, vocab_size: int, field: str = "sft.token_weights") -> np.ndarray:
  """[V] finite, non-negative loss weights by token id, not all 0 -> float32 numpy; else one line naming `field`."""
  weights = np.asarray(token_weights, np.float32)
  if weights.shape != (vocab_size,) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.any():
    checks.fail(field, f"expected [{vocab_size}] finite non-negative weights (one per token id), not all 0; got "
                f"shape {weights.shape}")
  return weights


def make_sft_run(model_config: ModelConfig, optim_config: OptimConfig, env, rollout_config, *, chunk_size: int = 50,
                 compiler_options: Mapping[str, Any] | None = None, token_weights: Any = None) -> Callable:
  """The SFT warm start: -> `run(keys, env_params, num_steps, policy_params=None, on_chunk=None, stacked=False)`.

  keys: [N] keys, one warm start per key, `vmap`ped in one program. policy_params: where every warm start begins
  (e.g. an HF checkpoint); None starts each from its own random init; with stacked=True they are [N, ...], one start
  per key (e.g. the result of an earlier run).
  Runs `num_steps` of `make_sft_iteration` in jitted chunks of at most `chunk_size` steps (one `lax.scan` each, the
  state donated; chunk programs are kept, so later runs reuse them) and calls `on_chunk(steps_done, metrics, params)`
  after each chunk: metrics as host arrays [N, chunk], params the policy params [N, ...] after the chunk (valid during
  the call only: the next chunk donates them; e.g. evaluate the warm start at several lengths in one run). Returns (policy params stacked [N, ...], metrics {name: [N, num_steps]}).
  The result does not depend on chunk_size. token_weights: None or [V] loss weights by token id (`sft_loss`).
  """
  checks.check_int(chunk_size, "sft.chunk_size", 1)
  spec = StateSpec.for_sft(model_config, optim_config, compiler_options=compiler_options)
  step = make_sft_iteration(model_config, optim_config, env, rollout_config, token_weights)
  init = {stacked: spec.jit(jax.vmap(lambda key, params: init_state(spec, key, params),
                                      in_axes=(0, 0 if stacked else None))) for stacked in (False, True)}
  chunks: dict[int, Callable] = {}

  def chunk_program(length: int) -> Callable:
    if length not in chunks:
      def run_chunk(state, env_params):
        return jax.lax.scan(lambda s, _: step(s, env_params), state, None, length=length)

      chunks[length] = spec.jit(jax.vmap(run_chunk, in_axes=(0, None)), donate_argnums=0)
    return chunks[length]

  def run(keys: Array, env_params: Any, num_steps: int, policy_params: dict | None = None,
          on_chunk: Callable[[int, dict, dict], None] | None = None, stacked: bool = False) -> tuple[dict, dict]:
    checks.check_int(num_steps, "sft.steps", 1)
    if policy_params is None:
      stacked = False
    return run_chunks(init[stacked](keys, policy_params), chunk_program, env_params, num_steps, chunk_size, on_chunk)

  return run


def run_chunks(state: TrainState, chunk_program: Callable[[int], Callable], env_params: Any, num_steps: int,
               chunk_size: int, on_chunk: Callable[[int, dict, dict], None] | None = None) -> tuple[dict, dict]:
  """The warm start's driver: `num_steps` SFT steps of the stacked `state` in chunks of at most `chunk_size`
  (`chunk_program(length)(state, env_params) -> (state, metrics [N, length])`, the state donated), `on_chunk` after
  each (as in `make_sft_run`). -> (policy params [N, ...], metrics {name: [N, num_steps]} on the host). Shared by
  `make_sft_run` and the experiment runner's sharded warm start."""
  history: list[dict] = []
  done = 0
  while done < num_steps:
    length = min(chunk_size, num_steps - done)
    state, metrics = chunk_program(length)(state, env_params)
    metrics = {name: np.asarray(value) for name, value in jax.device_get(metrics).items()}
    done += length
    history.append(metrics)
    if on_chunk is not None:
      on_chunk(done, metrics, state.params["policy"])
  stacked = {name: np.concatenate([m[name] for m in history], axis=1) for name in history[0]}
  return state.params["policy"], stacked
