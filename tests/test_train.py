"""The learner: the update's wiring against a hand-computed loss, learning on a fixed batch, the non-finite guard,
sharded (8 fake devices) vs one device over the estimator and loss registries, SFT, checkpoints, config errors.

Compile time dominates on CPU, so every test draws from a few shared shapes (one 1-layer d=64 model, batches of
8 x 64 tokens x 4 steps) and configs, `make_update` caches its compiled programs on the configs, programs are
compiled at a low XLA optimisation level (`FAST`), and random params are drawn in numpy (no init compile).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import PartitionSpec as P

from stepjax import credit, losses, rollout, sharding, train
from stepjax.envs.base import CommandTable, Environment, Fragments, StepInfo
from stepjax.models import PolicyWithValue, Transformer, ValueConfig, get_config
from stepjax.testing import random_episode_batch
from stepjax.tokenizers import ByteTokenizer

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time matters, code quality does not
TOK = ByteTokenizer()
VOCAB = 264  # holds the byte tokenizer's ids (SFT) and splits evenly over a tensor axis of 2
B, L, S = 8, 64, 4
MODEL = get_config("tiny", dtype="float32", num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=VOCAB)
# "SGD-like" Adam: with eps = 1 the first step is ~ lr * g, so comparisons are not at the mercy of sign(g ~ 0).
OPTIM = train.OptimConfig(actor_lr=0.1, critic_lr=0.2, eps=1.0, weight_decay=0.01, max_grad_norm=1.0)


def _update_config(estimator="step_gae", loss="gspo", kind="head", **overrides):
  # reinforce_pp(_baseline) whiten themselves; a second whitening is refused.
  whiten = {"token_gae": "token", "reinforce_pp": None, "reinforce_pp_baseline": None}.get(estimator, "step")
  base = dict(credit=credit.CreditConfig(estimator, gamma=0.9, lam=0.8, whiten=whiten),
              policy_loss=losses.PolicyLossConfig(loss), value=ValueConfig(kind=kind), value_coef=0.5,
              value_clip=0.2 if kind else None, kl_coef=0.05, entropy_coef=0.01)
  base.update(overrides)
  return train.UpdateConfig(**base)


HEAD_11 = _update_config()  # step_gae + gspo + head critic, 1 epoch x 1 minibatch
HEAD_22 = _update_config(epochs=2, minibatches=2)  # the same with shuffled minibatches


# ------------------------------------------------------------------------------------------------------
# Shared inputs (host arrays; every test device_puts its own copy, since updates donate the state).
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _abstract_trunk():
  boxed = jax.eval_shape(lambda: Transformer(MODEL).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return nn.meta.unbox(boxed)


def _random_trunk(seed: int) -> dict:
  """Transformer params drawn in numpy: norms 1, everything else N(0, 0.05^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return np.ones(leaf.shape, np.float32)
    return rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _abstract_trunk())


@functools.lru_cache(maxsize=None)
def _host_state(kind, kl: bool) -> train.TrainState:
  config = _update_config(kind=kind, kl_coef=0.05 if kl else 0.0, estimator={"head": "step_gae",
                          "separate": "token_gae", None: "grpo"}[kind])
  state = train.init_train_state(MODEL, config, OPTIM, jax.random.key(1), policy_params=_random_trunk(0))
  if kl:  # a reference that differs from the policy, so the KL term has a gradient
    state = state.replace(ref_params=_random_trunk(1))
  return jax.device_get(state)


def _fresh(host_state):
  """Device arrays committed to the first device, like `init_train_state` and `restore_checkpoint` return."""
  return jax.device_put(host_state, jax.devices()[0])


@functools.lru_cache(maxsize=None)
def _logits_fn():
  return jax.jit(lambda params, tokens: Transformer(MODEL).apply({"params": params}, tokens)[0],
                 compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def _batch(seed: int = 0):
  """A random batch whose behaviour log-probs are the initial policy's plus a little noise (ratios near 1)."""
  batch = random_episode_batch(seed, B, L, S, vocab_size=VOCAB, max_prompt=6, max_action=5, max_obs=4)
  logits = _logits_fn()(_random_trunk(0), jnp.asarray(batch.tokens))
  logp = np.asarray(losses.shifted_logprobs(logits, jnp.asarray(batch.tokens)))
  noise = np.random.default_rng(seed).normal(0.0, 0.02, logp.shape).astype(np.float32)
  logprobs = np.where(batch.action_mask, logp + noise, 0.0).astype(np.float32)
  groups = np.repeat(np.arange(B // 2), 2).astype(np.int32)  # pairs, so group baselines are not all trivial
  return batch.replace(logprobs=logprobs, group_id=groups).validate()


def _update(config, mesh=None):
  rules = None if mesh is None else sharding.get_rules("fsdp_tp")
  return train.make_update(MODEL, config, OPTIM, mesh=mesh, rules=rules, compiler_options=FAST)


def _max_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
                       a, b)
  return max(jax.tree.leaves(diffs))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------------
# The update against a plain reference.
# ------------------------------------------------------------------------------------------------------


def _np_step_gae(batch, step_values, bootstrap, gamma, lam):
  """Reverse loop over each row's valid steps (a prefix); truncated rows bootstrap, all others end at 0."""
  advantages = np.zeros(step_values.shape, np.float64)
  for b in range(batch.batch_size):
    next_value = bootstrap[b] if batch.truncated[b] else 0.0
    next_advantage = 0.0
    for t in reversed(range(int(batch.step_mask[b].sum()))):
      delta = batch.step_rewards[b, t] + gamma * next_value - step_values[b, t]
      next_advantage = delta + gamma * lam * next_advantage
      next_value = step_values[b, t]
      advantages[b, t] = next_advantage
  return advantages


def _reference_update(host_state, batch, config):
  """The documented loss written out by hand, differentiated with jax.grad, applied by the same optax transform.

  Returns (new params, loss, token advantages, {"values": [B, L] value head output, "step_advantages": [B, S]}).
  """
  tokens = jnp.asarray(batch.tokens)
  policy = PolicyWithValue(MODEL)
  values = jax.jit(lambda p: policy.apply({"params": p}, tokens)[1], compiler_options=FAST)(host_state.params["policy"])
  values = np.asarray(values, np.float64)
  rows = np.arange(B)[:, None]
  # The critic is read once per step, at the last context token before the step's first action token.
  step_values = np.where(batch.step_mask, values[rows, np.maximum(batch.step_start - 1, 0)], 0.0)
  bootstrap = values[np.arange(B), batch.bootstrap_pos]
  gae = _np_step_gae(batch, step_values, bootstrap, config.credit.gamma, config.credit.lam)
  returns = np.where(batch.step_mask, gae + step_values, 0.0)
  valid = batch.step_mask
  n = valid.sum()
  mean = gae[valid].mean()
  var = ((gae[valid] - mean) ** 2).sum() / (n - 1)
  whitened = np.where(valid, (gae - mean) / np.sqrt(var + config.credit.whiten_eps), 0.0)
  token_adv = np.where(batch.action_mask, whitened[rows, np.maximum(batch.step_ids, 0)], 0.0).astype(np.float32)
  ref_logits = _logits_fn()(host_state.ref_params, tokens)
  ref_logp = losses.shifted_logprobs(ref_logits, tokens)
  action = jnp.asarray(batch.action_mask)
  n_action = action.sum()

  def total_loss(params):
    logits, values, _, _ = policy.apply({"params": params["policy"]}, tokens)
    logp = losses.shifted_logprobs(logits, tokens)
    policy_loss, _ = losses.policy_loss(config.policy_loss, logp, jnp.asarray(batch.logprobs), jnp.asarray(token_adv),
                                        action, jnp.asarray(batch.step_ids), jnp.asarray(batch.step_mask))
    new = values[rows, np.maximum(batch.step_start - 1, 0)]
    old = jnp.asarray(step_values, jnp.float32)
    target = jnp.asarray(returns, jnp.float32)
    clipped = old + jnp.clip(new - old, -config.value_clip, config.value_clip)
    value_loss = 0.5 * jnp.sum(jnp.where(valid, jnp.maximum((new - target) ** 2, (clipped - target) ** 2), 0)) / n
    log_ratio = ref_logp - logp  # k3: exp(ref - logp) - (ref - logp) - 1, a token mean over action tokens
    kl = jnp.sum(jnp.where(action, jnp.exp(log_ratio) - log_ratio - 1, 0)) / n_action
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # the distribution that chose token p sits at p - 1
    entropy_tokens = jnp.pad(-jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1), ((0, 0), (1, 0)))
    entropy = jnp.sum(jnp.where(action, entropy_tokens, 0)) / n_action
    return (policy_loss + config.value_coef * value_loss + config.kl_coef * kl - config.entropy_coef * entropy)

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(total_loss)(params)
    updates, _ = train.make_optimizer(OPTIM).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), loss

  new_params, loss = jax.jit(step, compiler_options=FAST)(host_state.params, host_state.opt_state)
  return new_params, float(loss), token_adv, {"values": values, "step_advantages": whitened}


def _np_explained_variance(pred, target):
  var = target.var()
  return 1.0 - (target - pred).var() / var if var > 1e-8 else 0.0


def test_update_matches_hand_computed_loss():
  host_state, batch = _host_state("head", True), _batch()
  state, metrics = _update(HEAD_11)(_fresh(host_state), batch)
  expected, expected_loss, token_adv, extra = _reference_update(host_state, batch, HEAD_11)
  np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["advantage_mean"]), token_adv[batch.action_mask].mean(), atol=1e-5)
  # Credit diagnostics: advantages per step and per step index, the critic against the return-to-go.
  valid, step_adv = batch.step_mask, extra["step_advantages"]
  np.testing.assert_allclose(float(metrics["step_advantage_std"]), step_adv[valid].std(), atol=1e-5)
  for t in range(S):
    column = step_adv[valid[:, t], t]
    np.testing.assert_allclose(float(metrics[f"adv_step{t}_mean"]), column.mean() if column.size else 0.0, atol=1e-5)
    np.testing.assert_allclose(float(metrics[f"adv_step{t}_std"]), column.std() if column.size else 0.0, atol=1e-5)
  rewards = np.where(valid, batch.step_rewards, 0.0)
  to_go = np.where(valid, np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1], 0.0)  # undiscounted return-to-go
  rows, values = np.arange(B)[:, None], extra["values"]
  step_values = values[rows, np.maximum(batch.step_start - 1, 0)]
  np.testing.assert_allclose(float(metrics["critic_ev_steps"]),
                             _np_explained_variance(step_values[valid], to_go[valid]), atol=1e-4)
  action = batch.action_mask
  token_values = np.pad(values, ((0, 0), (1, 0)))[:, :-1]  # the value before each token: read at p - 1
  token_to_go = to_go[rows, np.maximum(batch.step_ids, 0)]
  np.testing.assert_allclose(float(metrics["critic_ev_tokens"]),
                             _np_explained_variance(token_values[action], token_to_go[action]), atol=1e-4)
  deltas = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), state.params, host_state.params)
  expected_deltas = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), expected, host_state.params)
  assert _max_diff(deltas, expected_deltas) < 1e-6
  assert _max_diff(state.params, host_state.params) > 1e-4  # it really moved
  # Both optimizer labels moved: the value head (critic_lr) and the trunk (actor_lr).
  assert np.abs(np.asarray(state.params["policy"]["value_head"]["kernel"]) -
                host_state.params["policy"]["value_head"]["kernel"]).max() > 1e-4
  assert int(state.step) == 1 and int(state.skipped_updates) == 0
  assert not np.array_equal(np.asarray(state.rng), host_state.rng)
  _assert_trees_equal(state.ref_params, host_state.ref_params)  # the reference stays frozen


def test_param_labels_and_tree_layout():
  for kind, keys in (("head", {"policy"}), ("separate", {"policy", "critic"}), (None, {"policy"})):
    params = _host_state(kind, False).params
    assert set(params) == keys
    labels = train.param_labels(params)
    assert ("value_head" in params["policy"]) == (kind == "head")
    if kind == "head":
      assert set(jax.tree.leaves(labels["policy"]["value_head"])) == {"critic"}
    if kind == "separate":
      assert set(jax.tree.leaves(labels["critic"])) == {"critic"} and "lm_head" not in params["critic"]
    assert set(jax.tree.leaves(labels["policy"]["layers_0"])) == {"actor"}


def test_updates_learn_on_a_fixed_batch():
  state, batch = _fresh(_host_state("head", True)), _batch()
  update = _update(HEAD_11)
  history = []
  for _ in range(6):
    state, metrics = update(state, batch)
    history.append({name: float(value) for name, value in metrics.items()})
  first, last = history[0], history[-1]
  assert last["value_loss"] < 0.7 * first["value_loss"]
  assert last["loss"] < first["loss"]
  # The behaviour log-probs are fixed, so the step ratios leave 1 as the policy moves (and GSPO clips them).
  assert max(abs(last["ratio_max"] - 1), abs(1 - last["ratio_min"])) > 1e-3 and last["clip_frac"] > 0
  assert all(np.isfinite(list(m.values())).all() for m in history)
  assert last["skipped_updates"] == 0 and int(state.step) == 6


def test_nonfinite_batch_skips_the_update():
  host_state, batch = _host_state("head", True), _batch()
  row, pos = np.argwhere(batch.action_mask)[3]
  poisoned = np.array(batch.logprobs)
  poisoned[row, pos] = np.nan
  state, metrics = _update(HEAD_11)(_fresh(host_state), batch.replace(logprobs=poisoned))
  _assert_trees_equal(state.params, host_state.params)
  _assert_trees_equal(state.opt_state, host_state.opt_state)
  assert int(state.skipped_updates) == 1 and float(metrics["skipped"]) == 1 and float(metrics["skipped_updates"]) == 1
  assert int(state.step) == 1
  train.check_halt(metrics, HEAD_11)  # halting is opt-in
  with pytest.raises(FloatingPointError, match="update: 1 minibatch update"):
    train.check_halt(metrics, dataclasses.replace(HEAD_11, halt_on_nonfinite=True))
  # NaN where no token is scored (off the action mask) is masked out and trains normally.
  off_action = np.array(batch.logprobs)
  off_action[~batch.action_mask] = np.nan
  state, metrics = _update(HEAD_11)(state, batch.replace(logprobs=off_action))
  assert float(metrics["skipped"]) == 0 and int(state.skipped_updates) == 1
  assert _max_diff(state.params, host_state.params) > 1e-4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# ------------------------------------------------------------------------------------------------------
# Sharded (2, 2, 2) mesh vs one device.
# ------------------------------------------------------------------------------------------------------

# A covering design (the default): every estimator, every policy loss and every critic kind is compiled and run at
# least once; critic-free estimators share one compiled `optimize` program, so each costs only its `prepare`.
# STEPJAX_FULL_SWEEP=1 runs every estimator x loss combination instead.
COVERING = [("step_gae", "gspo"), ("token_gae", "step_ratio"), ("grpo", "ppo"), ("rloo", "ppo"),
            ("reinforce_pp", "ppo"), ("reinforce_pp_baseline", "ppo"), ("gigpo", "ppo")]
FULL = list(itertools.product(credit.ESTIMATORS, losses.POLICY_LOSSES))
SWEEP = FULL if os.environ.get("STEPJAX_FULL_SWEEP") == "1" else COVERING
CRITIC_KIND = {"step": "head", "token": "separate", None: None}  # step critic: value head; token: separate critic


def test_sweep_covers_the_registries():
  assert {e for e, _ in SWEEP} == set(credit.ESTIMATORS)
  assert {l for _, l in SWEEP} == set(losses.POLICY_LOSSES)
  assert {CRITIC_KIND[credit.critic_level(e)] for e, _ in SWEEP} == {"head", "separate", None}


def test_a_new_estimator_is_one_registration():
  """Adding an estimator is one decorated function: UpdateConfig takes its name and make_update trains with it."""

  @credit.register_estimator("toy_return", critic=None, level="step")
  def _toy(config, batch, position_values):
    del config, position_values
    return jnp.where(batch.step_mask, batch.episode_returns()[:, None], 0.0), None

  try:
    config = train.UpdateConfig(credit=credit.CreditConfig("toy_return", whiten=None),
                                policy_loss=losses.PolicyLossConfig("gspo"), value=ValueConfig(kind=None))
    state = train.init_train_state(MODEL, config, OPTIM, jax.random.key(1), policy_params=_random_trunk(0))
    batch = _batch()
    _, metrics = train.make_update(MODEL, config, OPTIM, compiler_options=FAST)(state, batch)
    mask = np.asarray(batch.action_mask)
    expected = np.broadcast_to(np.asarray(batch.episode_returns())[:, None], mask.shape)[mask]
    assert float(metrics["advantage_mean"]) == pytest.approx(expected.mean(), rel=1e-5)
    assert float(metrics["advantage_std"]) == pytest.approx(expected.std(), rel=1e-4)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
  finally:
    credit.unregister_estimator("toy_return")
  with pytest.raises(ValueError, match="^estimator: unknown 'toy_return'"):
    credit.CreditConfig("toy_return")


@functools.lru_cache(maxsize=None)
def _mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@needs_8
@pytest.mark.parametrize("estimator,loss", SWEEP)
def test_sharded_update_matches_one_device(estimator, loss):
  kind = CRITIC_KIND[credit.critic_level(estimator)]
  # The step_gae case is the HEAD_22 config of the checkpoint test (shuffled minibatches, KL, value clipping).
  config = _update_config(estimator, loss, kind, epochs=2, minibatches=2, kl_coef=0.05 if kind == "head" else 0.0)
  host_state, batch = _host_state(kind, kind == "head"), _batch()
  single, single_metrics = _update(config)(_fresh(host_state), batch)
  sharded, sharded_metrics = _update(config, _mesh())(host_state, batch)
  assert _max_diff(sharded.params, single.params) <= 1e-5
  assert _max_diff(single.params, host_state.params) > 1e-4
  for name, value in single_metrics.items():
    np.testing.assert_allclose(float(sharded_metrics[name]), float(value), rtol=1e-4, atol=1e-5, err_msg=name)
  assert float(single_metrics["skipped"]) == 0
  # The state lives where the rules put it: FSDP over `embed`, tensor parallel over vocab / heads / mlp.
  assert sharded.params["policy"]["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  mu = sharded.opt_state[1].inner_states["actor"].inner_state[0].mu
  assert mu["policy"]["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  if kind == "separate":
    assert sharded.params["critic"]["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)


@needs_8
def test_sharded_init_and_batch_checks():
  rules = sharding.get_rules("fsdp_tp")
  config = _update_config("token_gae", "step_ratio", "separate", kl_coef=0.0)
  state = train.init_train_state(MODEL, config, OPTIM, jax.random.key(1), policy_params=_random_trunk(0),
                                 mesh=_mesh(), rules=rules)
  expected = train.train_state_shardings(MODEL, config, OPTIM, _mesh(), rules)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)
  assert state.params["critic"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  update = _update(config, _mesh())
  # Both checks run before anything is placed or compiled (the state is not even looked at).
  with pytest.raises(ValueError, match="batch_size: 6 is not divisible by the mesh's data x fsdp size 4"):
    update(None, random_episode_batch(0, 6, L, S, vocab_size=VOCAB))
  with pytest.raises(ValueError, match=r"update.minibatches: the minibatch size \(batch 8 / 4\): 2 is not divisible"):
    _update(dataclasses.replace(config, minibatches=4), _mesh())(None, _batch())


# ------------------------------------------------------------------------------------------------------
# SFT warm start.
# ------------------------------------------------------------------------------------------------------


@struct.dataclass
class TallyState:
  target: jax.Array
  count: jax.Array
  step_count: jax.Array
  done: jax.Array


@struct.dataclass
class TallyParams:
  max_steps: int = 6


class TallyEnv(Environment):
  """'Tally to n' (n in 1..3): say `add` n times, then `stop` (reward 1 when the tally is right)."""

  name = "tally"
  max_action_len = 6

  def __init__(self, tokenizer):
    self.fragments = Fragments(tokenizer, ["Tally to ", "1", "2", "3", ". Say add or stop.\n> ", "+1\n> ", "?\n> ",
                                           "Yes.", "No."])
    self.commands = CommandTable(tokenizer, ["add", "stop"])
    self.end_of_step = tokenizer.end_of_step_id
    self.max_obs_len = self.fragments.max_len_of([0, 1, 4])

  def default_params(self):
    return TallyParams()

  def reset(self, key, params):
    target = jax.random.randint(key, (), 1, 4)
    obs, n = self.fragments.compose(jnp.array([0, target, 4]), self.max_obs_len)
    return TallyState(target, jnp.int32(0), jnp.int32(0), jnp.bool_(False)), obs, n

  def step_env(self, key, state, action, action_len, params):
    command = self.commands.match(action, action_len)
    add, stop = command == 0, command == 1
    right = state.count == state.target
    obs, n = self.fragments.compose(jnp.select([add, stop & right, stop], [5, 7, 8], 6)[None], self.max_obs_len)
    reward = jnp.where(stop & right, 1.0, 0.0)
    info = StepInfo(parsed=command >= 0, success=stop & right)
    return state.replace(count=state.count + add), obs, n, reward, stop, info

  def expert_action(self, key, state, params):
    return self.commands.encode(jnp.where(state.count < state.target, 0, 1), self.max_action_len, self.end_of_step)

  def render(self, state):
    return f"tally {int(state.count)} / {int(state.target)}"


def test_sft_loss_ignores_non_action_targets():
  batch = _batch()
  loss_and_grad = jax.jit(jax.value_and_grad(lambda z, tokens: train.sft_loss(z, batch.replace(tokens=tokens))[0]),
                          compiler_options=FAST)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(B, L, VOCAB)).astype(np.float32))
  loss, grad = loss_and_grad(logits, batch.tokens)
  grad = np.asarray(grad)
  predicts_action = np.zeros((B, L), bool)
  predicts_action[:, :-1] = batch.action_mask[:, 1:]  # logits at p - 1 predict the action token at p
  assert np.all(grad[~predicts_action] == 0) and np.all(np.abs(grad[predicts_action]).sum(-1) > 0)
  other = np.array(batch.tokens)
  other[~batch.action_mask] = (other[~batch.action_mask] + 7) % VOCAB  # every prompt / observation target changes
  assert float(loss_and_grad(logits, other)[0]) == float(loss)
  other = np.array(batch.tokens)
  row, pos = np.argwhere(batch.action_mask)[0]
  other[row, pos] = (other[row, pos] + 7) % VOCAB
  assert float(loss_and_grad(logits, other)[0]) != float(loss)


def _tally_rollout():
  return rollout.RolloutConfig(num_tasks=4, episodes_per_task=2, max_steps=5, max_len=96, max_action_len=6,
                               stop_ids=(TOK.end_of_step_id, TOK.eos_id), pad_id=TOK.pad_id)


def test_weighted_sft_loss_matches_a_numpy_reference():
  batch = _batch()  # ragged action masks
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(B, L, VOCAB)).astype(np.float32)
  weights = rng.uniform(0.0, 5.0, size=VOCAB).astype(np.float32)
  loss, metrics = jax.jit(train.sft_loss, compiler_options=FAST)(jnp.asarray(logits), batch, jnp.asarray(weights))
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.action_mask)
  num = den = nll_sum = 0.0
  for b in range(B):
    for p in range(1, L):
      if mask[b, p]:
        z = logits[b, p - 1].astype(np.float64)
        nll = np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, p]]
        num, den, nll_sum = num + weights[tokens[b, p]] * nll, den + weights[tokens[b, p]], nll_sum + nll
  np.testing.assert_allclose(float(loss), num / den, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"]), nll_sum / mask[:, 1:].sum(), rtol=1e-5)  # unweighted either way
  ones, _ = train.sft_loss(jnp.asarray(logits), batch, jnp.ones(VOCAB))
  np.testing.assert_allclose(float(ones), float(train.sft_loss(jnp.asarray(logits), batch)[0]), rtol=1e-6)
  for bad in (np.ones(VOCAB + 1), -np.ones(VOCAB), np.zeros(VOCAB), np.full(VOCAB, np.nan)):
    with pytest.raises(ValueError, match=rf"sft.token_weights: expected \[{VOCAB}\] finite non-negative"):
      train.make_sft_iteration(MODEL, train.OptimConfig(actor_lr=1e-3), TallyEnv(TOK), _tally_rollout(), bad)


def test_sft_warm_start_on_expert_episodes():
  env = TallyEnv(TOK)
  config = _tally_rollout()
  optim = train.OptimConfig(actor_lr=3e-3)
  run = train.make_sft_run(MODEL, optim, env, config, chunk_size=4, compiler_options=FAST)
  params, history = run(jax.random.key(3)[None], env.default_params(), 8, _random_trunk(2))
  params = jax.tree.map(lambda x: x[0], params)
  assert history["nll"].shape == (1, 8)
  assert history["nll"][0, -1] < 0.6 * history["nll"][0, 0]
  assert history["token_accuracy"][0, -1] > history["token_accuracy"][0, 0]
  expert = jax.jit(rollout.make_rollout(Transformer(MODEL), env, config, actor="expert"), compiler_options=FAST)
  batch, info = expert(params, env.default_params(), jax.random.key(4))
  assert bool(np.all(info.success))  # expert episodes: every task solved
  # The warm-started policy seeds an RL state (a fresh value head on top).
  rl_state = train.init_train_state(MODEL, HEAD_11, OPTIM, jax.random.key(5), policy_params=params)
  _assert_trees_equal(train.policy_trunk(rl_state.params["policy"]), params)
  with pytest.raises(ValueError, match="sft.state: expected a policy-only TrainState"):
    train.make_sft_update(MODEL, optim, compiler_options=FAST)(rl_state, batch)


# ------------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_bit_identical_resume(tmp_path):
  update, batch = _update(HEAD_22), _batch()
  manager = train.make_checkpoint_manager(tmp_path / "run", max_to_keep=2)
  state = _fresh(_host_state("head", True))
  straight = []
  for i in range(4):
    state, metrics = update(state, batch)
    straight.append(jax.device_get(metrics))
    if i == 1:
      saved = jax.device_get(state)
      # Asynchronous: the next update donates these buffers while the write may still be running.
      assert train.save_checkpoint(manager, state, extra_metadata={"note": "half way", "lr": 0.1})
  manager.wait_until_finished()

  restored, step = train.restore_checkpoint(tmp_path / "run", train.abstract_state(state))
  assert step == 2
  _assert_trees_equal(restored, saved)  # exact: params, opt state, reference, rng, counters
  assert train.checkpoint_metadata(tmp_path / "run") == {"note": "half way", "lr": 0.1}
  resumed = []
  for _ in range(2):
    restored, metrics = update(restored, batch)
    resumed.append(jax.device_get(metrics))
  _assert_trees_equal(restored, jax.device_get(state))
  for expected, got in zip(straight[2:], resumed):
    assert expected == got
  # A restore target from jax.eval_shape (no shardings) works too.
  abstract = jax.eval_shape(lambda: jax.device_put(_host_state("head", True)))
  _assert_trees_equal(train.restore_checkpoint(manager, abstract)[0], saved)
  manager.close()


def test_incomplete_checkpoint_is_ignored_and_keep_last_k(tmp_path):
  host = _host_state(None, False)
  manager = train.make_checkpoint_manager(tmp_path, max_to_keep=2, async_save=False)
  for step in (1, 2, 3):
    train.save_checkpoint(manager, _fresh(host).replace(step=jnp.int32(step)), step=step)
  manager.close()
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 3]
  # A save killed mid-write leaves orbax's temporary directory behind (renamed to "4" only once complete).
  partial = tmp_path / "4.orbax-checkpoint-tmp-1712345678"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "partial.bin").write_bytes(b"\0" * 64)
  restored, step = train.restore_checkpoint(tmp_path, train.abstract_state(host))
  assert step == 3 and int(restored.step) == 3
  _assert_trees_equal(restored.params, host.params)
  with pytest.raises(FileNotFoundError, match="checkpoint.step: 4 is not a complete checkpoint"):
    train.restore_checkpoint(tmp_path, train.abstract_state(host), step=4)
  # A writer reopening the run clears the leftover (in the background, at the latest before its first save).
  manager = train.make_checkpoint_manager(tmp_path, async_save=False)
  train.save_checkpoint(manager, _fresh(host), step=5)
  manager.close()
  assert not partial.exists() and train.restore_checkpoint(tmp_path, train.abstract_state(host))[1] == 5


def test_missing_checkpoint_directory(tmp_path):
  template = train.abstract_state(_host_state(None, False))
  with pytest.raises(FileNotFoundError, match=r"checkpoint.directory: .*/nowhere does not exist"):
    train.restore_checkpoint(tmp_path / "nowhere", template)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="checkpoint.directory: .*/empty holds no complete checkpoint"):
    train.restore_checkpoint(tmp_path / "empty", template)
  manager = train.make_checkpoint_manager(tmp_path / "json")
  with pytest.raises(ValueError, match="checkpoint.extra_metadata: must be JSON-serializable"):
    train.save_checkpoint(manager, _fresh(_host_state(None, False)), extra_metadata={"bad": object()})
  manager.close()


# ------------------------------------------------------------------------------------------------------
# Config validation: one line naming the field, before anything compiles.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,message", [
    (lambda: train.OptimConfig(schedule="linear"),
     "optim.schedule: unknown 'linear'; allowed: constant, warmup_constant, cosine"),
    (lambda: train.OptimConfig(schedule="cosine"), "optim.total_steps: required by schedule 'cosine'"),
    (lambda: train.OptimConfig(schedule="cosine", warmup_steps=10, total_steps=5),
     "optim.total_steps: must be an int >= 11"),
    (lambda: train.OptimConfig(actor_lr=-1.0), "optim.actor_lr: must be >= 0"),
    (lambda: train.OptimConfig(b2=1.0), r"optim.b2: must be in \[0, 1\)"),
    (lambda: train.OptimConfig(max_grad_norm=0.0), "optim.max_grad_norm: must be > 0 or None"),
    (lambda: _update_config("step_gae", kind=None), "update.value.kind: estimator 'step_gae' reads a critic"),
    (lambda: _update_config("token_gae", kind=None), "update.value.kind: estimator 'token_gae' reads a critic"),
    (lambda: _update_config("grpo", kind="head"), "update.value.kind: estimator 'grpo' reads no critic"),
    (lambda: _update_config(kind="tower"), "update.value.kind: unknown 'tower'; allowed: head, separate, None"),
    # A PolicyLossConfig is checked when it is built, before it reaches an UpdateConfig.
    (lambda: _update_config(policy_loss=losses.PolicyLossConfig("trpo")), "^name: unknown 'trpo'"),
    (lambda: _update_config(policy_loss=losses.PolicyLossConfig("ppo", agg_mode="sum")),
     "^agg_mode: unknown 'sum'"),
    (lambda: _update_config(kl_kind="k9"), "update.kl_kind: unknown 'k9'"),
    (lambda: _update_config(minibatches=0), "update.minibatches: must be an int >= 1"),
    (lambda: _update_config(epochs=1.5), "update.epochs: must be an int >= 1"),
    (lambda: _update_config(value_clip=-0.1), "update.value_clip: must be >= 0 or None"),
    (lambda: _update_config(kl_coef=float("nan")), "update.kl_coef: must be >= 0"),
    (lambda: credit.CreditConfig("ppo_gae"), "^estimator: unknown 'ppo_gae'; allowed: step_gae"),
])
def test_config_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_batch_errors_before_compiling():
  # The state is never looked at: the check comes first.
  with pytest.raises(ValueError, match="update.minibatches: 3 does not divide the batch size 8"):
    _update(dataclasses.replace(HEAD_11, minibatches=3))(None, _batch())
  with pytest.raises(ValueError, match="rules: pass mesh and rules together"):
    train.make_update(MODEL, HEAD_11, OPTIM, mesh=object())
  with pytest.raises(ValueError, match="compiler_options: expected a mapping"):
    train.make_update(MODEL, HEAD_11, OPTIM, compiler_options=["O0"])


def test_schedules():
  def at(config, steps):
    schedule = train.learning_rate_schedule(config, 1.0)
    return [float(schedule(s)) for s in steps]

  assert at(train.OptimConfig(), [0, 100]) == [1.0, 1.0]
  np.testing.assert_allclose(at(train.OptimConfig(schedule="warmup_constant", warmup_steps=4), [0, 2, 4, 50]),
                             [0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(at(train.OptimConfig(schedule="cosine", warmup_steps=2, total_steps=12), [0, 1, 2, 7, 12]),
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
