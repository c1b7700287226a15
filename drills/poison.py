"""Poison drill: NaN / Inf injected into a reward, a logit and a gradient; each poisoned update must be skipped.

    python -m drills.poison

Runs the RL update (`train.make_update`: step GAE + GSPO + a value head, step whitening, 2 epochs x 2 minibatches;
Dr.GRPO, 1 x 1, for the gradient) and the SFT update
(`train.make_sft_update`) of a 1-layer model on a random packed batch, with one poison each (`CASES`):

  reward          a NaN (or +Inf) step reward. The step's GAE advantage and return are NaN, and step whitening
                  spreads the NaN to every advantage of the batch (its mean and std are batch-wide), so the policy
                  loss and the value loss of every minibatch are NaN: the whole update is skipped (with E epochs x M
                  minibatches, all E*M steps); nothing is half-applied, the critic included. (SFT reads no rewards.)
  logit           one row of the token embedding set to NaN (a corrupt checkpoint row) and that token put in the
                  batch before a scored action: its hidden state, and through attention every later position's
                  logits, are NaN, so the loss is.
  logit, padding  the same NaN row, with the token only in one row's padding, after everything that is scored: the
                  causal mask does not stop it, since a masked key's probability is 0 and 0 x NaN = NaN in the
                  attention's weighted sum of values, so the whole row's logits are NaN.
  gradient        a huge but finite reward (1e30) under Dr.GRPO (critic-free, advantages R - group mean, never
                  rescaled): the loss (~ the advantage) is finite, but the gradient's global norm overflows float32
                  (clipping would then scale the step to zero or NaN). Only the gradient check catches this one.
                  (A huge embedding row does not do it: RMSNorm scales it to 0 and the gradient stays finite.)

For each the drill checks: the update reports skipped (= its minibatch steps) and skipped_updates; params and the
whole optimizer state (Adam mu, nu and counts) are bit-identical to before; the next update, on a good batch (without
the poisoned token; the NaN row stays, unread), is applied (skipped 0, params move, every other value finite); and
with halt_on_nonfinite `check_halt` raises one line. Prints
"poison drill: N/N poisoned updates skipped, params and optimizer state bit-identical".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stepjax import credit, losses, train
from stepjax.models import Transformer, ValueConfig, get_config, transformer
from stepjax.testing import random_episode_batch

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time matters, code quality does not
VOCAB = 264
POISON_TOKEN = VOCAB - 1  # the good batches draw tokens below it, so a NaN row here is read only when placed
B, L, S = 8, 64, 4
MODEL = get_config("tiny", dtype="float32", num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=VOCAB)
OPTIM = train.OptimConfig(actor_lr=1e-2, critic_lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)
# 2 epochs x 2 shuffled minibatches: a skipped update is 4 skipped steps, none of them half-applied.
RL = train.UpdateConfig(credit=credit.CreditConfig("step_gae", gamma=0.9, lam=0.8, whiten="step"),
                        policy_loss=losses.PolicyLossConfig("gspo"), value=ValueConfig(kind="head"), value_coef=0.5,
                        value_clip=0.2, entropy_coef=0.01, epochs=2, minibatches=2)
DR_GRPO = train.UpdateConfig(credit=credit.CreditConfig("grpo", normalize_std=False, whiten=None),
                             policy_loss=losses.PolicyLossConfig("gspo"), value=ValueConfig(kind=None))
HUGE_REWARD = 1e30


# ------------------------------------------------------------------------------------------------------
# States and batches (host copies: updates donate their state).
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def initial_state(config: train.UpdateConfig | None) -> train.TrainState:
  """The TrainState `config` trains (None: SFT's, policy only), on the same random trunk; host arrays."""
  key = jax.random.key(0)
  trunk = transformer.init_params(MODEL, key)
  if config is None:
    return jax.device_get(train.init_sft_state(MODEL, OPTIM, key, policy_params=trunk))
  return jax.device_get(train.init_train_state(MODEL, config, OPTIM, key, policy_params=trunk))


@functools.lru_cache(maxsize=None)
def _logits_fn():
  return jax.jit(lambda params, tokens: Transformer(MODEL).apply({"params": params}, tokens)[0],
                 compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def good_batch(seed: int):
  """A random batch (tokens below POISON_TOKEN) whose behaviour log-probs are the initial policy's."""
  batch = random_episode_batch(seed, B, L, S, vocab_size=POISON_TOKEN, max_prompt=6, max_action=5, max_obs=4,
                               fill=True)
  params = train.policy_trunk(initial_state(None).params["policy"])
  logp = np.asarray(losses.shifted_logprobs(_logits_fn()(params, jnp.asarray(batch.tokens)),
                                            jnp.asarray(batch.tokens)))
  logprobs = np.where(batch.action_mask, logp, 0.0).astype(np.float32)
  return jax.device_get(batch.replace(logprobs=logprobs, group_id=np.repeat(np.arange(B // 2), 2).astype(np.int32))
                        .validate())


def _fresh(host_state):
  return jax.device_put(host_state, jax.devices()[0])


# ------------------------------------------------------------------------------------------------------
# Poisons: (state, batch) -> (state, batch), host arrays.
# ------------------------------------------------------------------------------------------------------


def _with_nan_embedding_row(state: train.TrainState) -> train.TrainState:
  params = jax.tree.map(np.array, state.params)  # writable copies
  params["policy"]["embed"]["embedding"][POISON_TOKEN] = np.nan
  return state.replace(params=params)


def nan_reward(state, batch, value=np.nan):
  rewards = np.array(batch.step_rewards)
  rewards[1, 0] = value  # a valid step (fill=True: every row has all its steps)
  assert batch.step_mask[1, 0]
  return state, batch.replace(step_rewards=rewards)


def inf_reward(state, batch):
  return nan_reward(state, batch, np.inf)


def nan_logit(state, batch):
  """The NaN-row token as the last prompt token of row 2 (read before its first action)."""
  tokens = np.array(batch.tokens)
  tokens[2, batch.step_start[2, 0] - 1] = POISON_TOKEN
  return _with_nan_embedding_row(state), batch.replace(tokens=tokens)


def nan_in_padding(state, batch):
  """The NaN-row token only in the padding of the shortest row: after everything that is scored or read."""
  row = int(np.argmin(batch.seq_len))
  assert batch.seq_len[row] < L and not batch.truncated[row]
  tokens = np.array(batch.tokens)
  tokens[row, batch.seq_len[row]:] = POISON_TOKEN
  return _with_nan_embedding_row(state), batch.replace(tokens=tokens)


def huge_reward(state, batch):
  return nan_reward(state, batch, HUGE_REWARD)


# ------------------------------------------------------------------------------------------------------
# One drill case.
# ------------------------------------------------------------------------------------------------------


def bit_identical(a, b) -> bool:
  """Every leaf has the same dtype, shape and bytes (NaN payloads included)."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  if tree_a != tree_b:
    return False
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      return False
    if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
      return False
  return True


def finite_except_poison(params) -> bool:
  """Every param value finite, but for the NaN embedding row when there is one."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in flat:
    leaf = np.asarray(leaf)
    if "embedding" in jax.tree_util.keystr(path):
      leaf = np.delete(leaf, POISON_TOKEN, axis=0)
    if not np.isfinite(leaf).all():
      return False
  return True


@dataclasses.dataclass
class Outcome:
  """What one poisoned update did, then the good update after it."""

  name: str
  loss: float  # of the poisoned update (mean over its minibatch steps)
  grad_norm: float
  skipped: int
  skipped_updates: int
  expected_skips: int
  params_identical: bool
  opt_state_identical: bool
  halted: str  # check_halt's line with halt_on_nonfinite (empty if it did not raise)
  next_skipped: int  # the good update after it
  next_moved: bool
  next_finite: bool

  @property
  def ok(self) -> bool:
    return (self.skipped == self.expected_skips and self.skipped_updates == self.expected_skips
            and self.params_identical and self.opt_state_identical and self.halted.count("\n") == 0
            and self.halted != "" and self.next_skipped == 0 and self.next_moved and self.next_finite)

  def line(self) -> str:
    return (f"{self.name}: loss {self.loss:.3g}, grad norm {self.grad_norm:.3g}, skipped {self.skipped}/{self.expected_skips}, params "
            f"{'bit-identical' if self.params_identical else 'CHANGED'}, optimizer state "
            f"{'bit-identical' if self.opt_state_identical else 'CHANGED'}; next good update "
            f"{'applied' if self.next_skipped == 0 and self.next_moved else 'NOT applied'}"
            f"{'' if self.next_finite else ' (NON-FINITE params)'}; halt: {self.halted or 'did not raise'}")


@functools.lru_cache(maxsize=None)
def update_fn(config: train.UpdateConfig | None) -> Callable:
  """make_update of `config`, or make_sft_update for None."""
  if config is None:
    return train.make_sft_update(MODEL, OPTIM, compiler_options=FAST)
  return train.make_update(MODEL, config, OPTIM, compiler_options=FAST)


def run_case(name: str, config: train.UpdateConfig | None, poison: Callable) -> tuple[Outcome, dict]:
  """Poisons the initial state / a good batch, updates, checks; then one good update. config None: SFT. Returns
  (outcome, the poisoned update's metrics as floats)."""
  update = update_fn(config)
  before, batch = poison(initial_state(config), good_batch(0))
  state, metrics = update(_fresh(before), batch)
  metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
  after = jax.device_get(state)
  try:
    if config is None:  # the runner's SFT warm start would name its own field and flag
      train.check_halt(metrics, True, field="sft", flag="train.halt_on_nonfinite")
    else:
      train.check_halt(metrics, dataclasses.replace(config, halt_on_nonfinite=True))
    halted = ""
  except FloatingPointError as error:
    halted = str(error)
  state, next_metrics = update(state, good_batch(1))
  moved = not bit_identical(jax.device_get(state.params), after.params)
  outcome = Outcome(name=name, loss=metrics["loss"], grad_norm=metrics["grad_norm"], skipped=int(metrics["skipped"]),
                    skipped_updates=int(metrics["skipped_updates"]),
                    expected_skips=1 if config is None else config.epochs * config.minibatches,
                    params_identical=bit_identical(after.params, before.params),
                    opt_state_identical=bit_identical(after.opt_state, before.opt_state), halted=halted,
                    next_skipped=int(next_metrics["skipped"]), next_moved=moved,
                    next_finite=finite_except_poison(state.params))
  return outcome, metrics


# ------------------------------------------------------------------------------------------------------
# The whole iteration: rollout + update in one jit, the NaN coming from the environment.
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def loop_setup():
  """(jitted `make_train_iteration` on lookup_qa with a byte tokenizer, env, rollout config); a random policy, so
  nearly every action spells no command and gets `invalid_penalty`."""
  from stepjax import rollout
  from stepjax.envs.lookup_qa import LookupQA
  from stepjax.tokenizers import ByteTokenizer

  tokenizer = ByteTokenizer()
  env = LookupQA(tokenizer, num_entities=4, max_hops=1)
  rollout_config = rollout.RolloutConfig(num_tasks=4, episodes_per_task=2, max_steps=2, max_len=192,
                                         max_action_len=8, stop_ids=(tokenizer.end_of_step_id, tokenizer.eos_id),
                                         pad_id=tokenizer.pad_id)
  iteration = train.make_train_iteration(MODEL, env, rollout_config, RL, OPTIM)
  return jax.jit(iteration, compiler_options=FAST), env


def run_loop_case(name: str = "rl loop: NaN reward from the environment (rollout + update, one jit)"
                  ) -> tuple[Outcome, dict]:
  """One RL iteration whose environment gives NaN rewards (invalid_penalty=NaN), then one with a finite penalty."""
  iteration, env = loop_setup()
  poisoned, good = env.default_params().replace(invalid_penalty=float("nan")), env.default_params().replace(
      invalid_penalty=-0.1)
  before = initial_state(RL)
  state, metrics = iteration(_fresh(before), poisoned)
  metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
  after = jax.device_get(state)
  try:
    train.check_halt(metrics, dataclasses.replace(RL, halt_on_nonfinite=True))
    halted = ""
  except FloatingPointError as error:
    halted = str(error)
  state, next_metrics = iteration(state, good)
  outcome = Outcome(name=name, loss=metrics["loss"], grad_norm=metrics["grad_norm"], skipped=int(metrics["skipped"]),
                    skipped_updates=int(metrics["skipped_updates"]), expected_skips=RL.epochs * RL.minibatches,
                    params_identical=bit_identical(after.params, before.params),
                    opt_state_identical=bit_identical(after.opt_state, before.opt_state), halted=halted,
                    next_skipped=int(next_metrics["skipped"]),
                    next_moved=not bit_identical(jax.device_get(state.params), after.params),
                    next_finite=finite_except_poison(state.params))
  return outcome, metrics


SFT = None
# name -> (update config, None for SFT; poison)
CASES: dict[str, tuple[train.UpdateConfig | None, Callable]] = {
    "rl reward NaN": (RL, nan_reward),
    "rl reward +Inf": (RL, inf_reward),
    "rl logit NaN (embedding row)": (RL, nan_logit),
    "rl logit NaN (embedding row, in the padding)": (RL, nan_in_padding),
    "rl gradient overflow (reward 1e30, Dr.GRPO)": (DR_GRPO, huge_reward),
    "sft logit NaN (embedding row)": (SFT, nan_logit),
    "sft logit NaN (embedding row, in the padding)": (SFT, nan_in_padding),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.parse_args(argv)
  start = time.perf_counter()
  outcomes = [run_case(name, *case)[0] for name, case in CASES.items()] + [run_loop_case()[0]]
  passed = sum(outcome.ok for outcome in outcomes)
  print(f"poison drill: {passed}/{len(outcomes)} poisoned updates skipped, params and optimizer state bit-identical")
  for outcome in outcomes:
    print(f"  [{'ok' if outcome.ok else 'FAIL'}] {outcome.line()}")
  print(f"({time.perf_counter() - start:.1f} s)")
  return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
  sys.exit(main())
