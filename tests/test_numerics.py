"""Numerics at scale: the two reduced-precision modes track the float32 update, and remat changes nothing.

    mode           ModelConfig dtype / param_dtype   OptimConfig.state_dtype   what is bfloat16
    F32            float32 / float32                 "float32"                 nothing (the reference)
    BF16_COMPUTE   bfloat16 / float32                "float32"                 matmul inputs and activations; master
                                                                               weights, grads, Adam moments are f32
    BF16_PARAMS    bfloat16 / bfloat16               "float32"                 also the stored params (and grads);
                                                                               the optimizer step and moments are f32

Each mode runs STEPS updates of `make_update` from the same initial params (rounded to bfloat16 for BF16_PARAMS) on
the same batch, for each of SEEDS (params and batch), and is compared with the float32 run. The optimizer is the
"SGD-like" Adam of tests/test_train.py (eps = 1, so a step is ~ lr * g / (|g| + 1), smooth in g): with eps = 1e-8 the
first step is lr * sign(g), and a bfloat16 rounding that flips the sign of a near-zero gradient moves that parameter
by 2 lr, which says nothing about the precision of the step.

Tolerances. bfloat16 keeps 8 significant bits: one ulp (the spacing) is 2^-8 |x| to 2^-7 |x|, so one rounding is a
relative error of at most 2^-8 ~ 0.4%. Measured on CPU over seeds 0-7 (the test runs 0-3), bound with ~2x margin:

  per-step loss        |loss - loss_f32|. BF16_COMPUTE <= 5e-3 (measured max 1.9e-3; the log-probs come from
                       bfloat16 matmuls). BF16_PARAMS <= 4e-2 (measured max 1.9e-2, at the last step: it grows by
                       ~4e-3 a step, as part of each step is rounded away, see below).
  BF16_COMPUTE update  ||delta - delta_f32|| / ||delta_f32|| <= 0.015, delta = final - initial params: the float32
                       master weights add the steps exactly, only the gradients carry bfloat16 error (~2^-8).
                       Measured 0.0047 - 0.0064.
  BF16_PARAMS params   ||p - p_f32|| <= 2 sqrt(STEPS + 1) ||round_bf16(p0) - p0||: storing the params rounds them
                       once at init and once per step, each rounding about as large as the initial one (same
                       params, same grid). Independent roundings add up to sqrt(STEPS + 1) times the initial one,
                       perfectly coherent ones to STEPS + 1 times (2.4x more); the bound sits between. Measured
                       1.29 - 1.55 x sqrt(STEPS + 1) x the initial rounding: partly coherent (a step below half an
                       ulp is lost the same way every time); the gradient and optimizer error hide below this floor.
  elementwise          |p - p_f32| in bfloat16 ulps at p_f32 (|p_f32| floored at 2^-6, below which an ulp says
                       nothing): BF16_COMPUTE <= 2 (measured max 0.90), BF16_PARAMS <= 10 (measured max 5.25).

The f32 run itself moves by ||delta_f32|| = 0.22 - 0.24 (asserted > 0.1) and its loss falls by 0.3 - 0.5 (asserted
> 0.1): 67x the BF16_COMPUTE update bound, and 2.5x the BF16_PARAMS storage bound (asserted > 2x), so either bound
fails for a wrong update. (The BF16_PARAMS run makes 96 - 98% of the f32 loss progress; over these few eps = 1 steps
state_dtype=None measures the same, as the second-moment stall it avoids takes many steps: tested directly below.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stepjax import credit, losses, sharding, train
from stepjax.models import Transformer, ValueConfig, get_config
from stepjax.testing import random_episode_batch
from stepjax.train.state import abstract_state
from stepjax.train.update import update_step

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time matters, code quality does not
VOCAB, B, L, S = 64, 8, 32, 3
STEPS = 5
SEEDS = (0, 1, 2, 3)
F32 = get_config("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16,
                 vocab_size=VOCAB)
BF16_COMPUTE = F32.replace(dtype="bfloat16")
BF16_PARAMS = F32.replace(dtype="bfloat16", param_dtype="bfloat16")
OPTIM = train.OptimConfig(actor_lr=0.05, critic_lr=0.1, eps=1.0, weight_decay=0.01, max_grad_norm=1.0)
# Critic-free (GRPO over pairs) to keep the five compiled updates cheap; the critics' dtypes and update programs are
# checked abstractly below. The clip range [0.01, 101] clips no ratio: the loss is smooth in the params, so no
# comparison hangs on a ratio crossing a clip edge.
UPDATE = train.UpdateConfig(credit=credit.CreditConfig("grpo"),
                            policy_loss=losses.PolicyLossConfig("ppo", clip_low=0.99, clip_high=100.0),
                            value=ValueConfig(kind=None), entropy_coef=0.01)

LOSS_ATOL = {BF16_COMPUTE: 5e-3, BF16_PARAMS: 4e-2}
ULPS = {BF16_COMPUTE: 2.0, BF16_PARAMS: 10.0}
BF16_COMPUTE_UPDATE_RTOL = 0.015
BF16_PARAMS_ROUNDING_FACTOR = 2.0


# ------------------------------------------------------------------------------------------------------
# Shared runs (each mode compiles once; the seeds reuse its programs).
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _abstract_trunk():
  boxed = jax.eval_shape(lambda: Transformer(F32).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=None)
def _inputs(seed: int):
  """(float32 trunk drawn in numpy: norms 1, the rest N(0, 0.1^2); a random batch whose behaviour log-probs are
  uniform, -log V: no forward to compile, and with UPDATE's wide clip range no ratio is clipped)."""
  rng = np.random.default_rng(seed)
  trunk = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.ones(leaf.shape, np.float32) if path[-1].key == "scale"
      else rng.normal(0.0, 0.1, leaf.shape).astype(np.float32), _abstract_trunk())
  batch = random_episode_batch(seed, B, L, S, vocab_size=VOCAB, max_prompt=6, max_action=5, max_obs=4)
  logprobs = np.where(batch.action_mask, -np.log(VOCAB), 0.0).astype(np.float32)
  return trunk, batch.replace(logprobs=logprobs).validate()


@functools.lru_cache(maxsize=None)
def _initial_state(model, optim, seed: int) -> train.TrainState:
  """Host copy of the fresh state: float32 numpy params in, cast to model.param_dtype by `init_train_state`."""
  return jax.device_get(train.init_train_state(model, UPDATE, optim, jax.random.key(1),
                                               policy_params=_inputs(seed)[0]))


@functools.lru_cache(maxsize=None)
def _run(model, seed: int, start=None):
  """(initial host state, final host state, per-step losses [STEPS]) of STEPS updates on seed's batch. start: the
  model whose initial state to reuse (remat changes neither the params nor the optimizer state)."""
  state0 = _initial_state(start or model, OPTIM, seed)
  update = train.make_update(model, UPDATE, OPTIM, compiler_options=FAST)
  state, losses_per_step = jax.device_put(state0, jax.devices()[0]), []
  for _ in range(STEPS):
    state, metrics = update(state, _inputs(seed)[1])
    losses_per_step.append(float(metrics["loss"]))
  return state0, jax.device_get(state), np.asarray(losses_per_step)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _bf16_ulps(diff: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """|diff| in units of the bfloat16 spacing at |reference| (floored at 2^-6): 2^(e - 8) for |x| = m 2^e, m in
  [0.5, 1)."""
  _, exponent = np.frexp(np.maximum(np.abs(reference), 2.0 ** -6))
  return np.abs(diff) / 2.0 ** (exponent - 8)


def _floating_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ------------------------------------------------------------------------------------------------------
# bfloat16 against float32.
# ------------------------------------------------------------------------------------------------------


def _reference(seed: int):
  """The float32 run of `seed`: (initial flat params, final flat params, losses), checked to really train."""
  start, f32, f32_losses = _run(F32, seed)
  p0, p_f32 = _flat(start.params), _flat(f32.params)
  assert np.linalg.norm(p_f32 - p0) > 0.1 and f32_losses[0] - f32_losses[-1] > 0.1
  return p0, p_f32, f32_losses


@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_compute_tracks_float32(seed):
  p0, p_f32, f32_losses = _reference(seed)
  start, bf16, bf16_losses = _run(BF16_COMPUTE, seed)
  p_bf16 = _flat(bf16.params)
  np.testing.assert_array_equal(_flat(start.params), p0)  # float32 master weights: the same start
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0, atol=LOSS_ATOL[BF16_COMPUTE])
  delta_f32 = p_f32 - p0
  assert np.linalg.norm((p_bf16 - p0) - delta_f32) <= BF16_COMPUTE_UPDATE_RTOL * np.linalg.norm(delta_f32)
  assert np.max(_bf16_ulps(p_bf16 - p_f32, p_f32)) <= ULPS[BF16_COMPUTE]
  # Everything the optimizer keeps is float32, and so are the grads (a cotangent has its primal's dtype).
  assert _floating_dtypes(bf16.params) == _floating_dtypes(bf16.opt_state) == {"float32"}
  assert int(bf16.skipped_updates) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_params_track_float32_to_the_storage_rounding(seed):
  p0, p_f32, f32_losses = _reference(seed)
  start, bf16, bf16_losses = _run(BF16_PARAMS, seed)
  p_bf16 = _flat(bf16.params)
  rounded = np.asarray(jnp.asarray(p0, jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(_flat(start.params), rounded)  # the float32 start, rounded
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0, atol=LOSS_ATOL[BF16_PARAMS])
  bound = BF16_PARAMS_ROUNDING_FACTOR * math.sqrt(STEPS + 1) * np.linalg.norm(rounded - p0)
  assert 0 < bound < 0.5 * np.linalg.norm(p_f32 - p0)  # the floor is well below the motion: the bound can fail
  assert np.linalg.norm(p_bf16 - p_f32) <= bound
  assert np.max(_bf16_ulps(p_bf16 - p_f32, p_f32)) <= ULPS[BF16_PARAMS]
  assert _floating_dtypes(bf16.params) == {"bfloat16"}
  assert _floating_dtypes(bf16.opt_state) == {"float32"}  # state_dtype="float32": both Adam moments
  assert int(bf16.skipped_updates) == 0


def test_bf16_params_lose_steps_below_half_an_ulp():
  """Why BF16_PARAMS needs steps well above 2^-8 |p|: a step below half an ulp (2^-9 |p| to 2^-8 |p|) rounds back to
  the same bfloat16 value. At the default actor_lr = 1e-6 (Adam steps ~ lr), params of |p| ~ 0.05 do not move (only
  those below ~5e-4, under 2% here); float32 ones all do."""
  rng = np.random.default_rng(0)
  w = rng.normal(0.0, 0.05, (64, 64)).astype(np.float32)
  grads = {"policy": {"w": rng.normal(0.0, 1.0, w.shape).astype(np.float32)}}
  tx = train.make_optimizer(train.OptimConfig())  # actor_lr = 1e-6, eps = 1e-8: the first step is ~1e-6 sign(g)

  def step(params):
    cast = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, _ = tx.update(cast, tx.init(params), params)
    return optax.apply_updates(params, updates)  # as `update.guarded_step` applies them

  for dtype, moved_at_least, moved_at_most in ((jnp.float32, 1.0, 1.0), (jnp.bfloat16, 0.0, 0.02)):
    params = {"policy": {"w": jnp.asarray(w, dtype)}}
    moved = np.mean(np.asarray(step(params)["policy"]["w"]) != np.asarray(params["policy"]["w"]))
    assert moved_at_least <= moved <= moved_at_most, (dtype, moved)


def test_bf16_second_moment_never_decays_without_float32_state():
  """Why state_dtype="float32": in bfloat16, b2 = 0.999 rounds to 1, so Adam's nu keeps its peak forever (and an
  increment 1e-3 g^2 below half an ulp of nu is lost). One gradient of 1, then zeros: the float32 nu decays by b2 a
  step; the bfloat16 one never moves."""
  params = {"policy": {"w": jnp.ones((8,), jnp.bfloat16)}}
  grads = [jnp.full((8,), g, jnp.bfloat16) for g in (1.0, 0.0, 0.0, 0.0)]
  for state_dtype in ("float32", None):
    tx = train.make_optimizer(train.OptimConfig(max_grad_norm=None, state_dtype=state_dtype))
    state, nus = tx.init(params), []
    for g in grads:
      _, state = tx.update({"policy": {"w": g}}, state, params)
      nus.append(np.asarray(state.inner_states["actor"].inner_state[0].nu["policy"]["w"], np.float64)[0])
    if state_dtype == "float32":
      np.testing.assert_allclose(nus[1:], 1e-3 * 0.999 ** np.arange(1, 4), rtol=1e-6)
    else:
      assert nus[0] == nus[1] == nus[2] == nus[3] == pytest.approx(1e-3, rel=2 ** -8)


# ------------------------------------------------------------------------------------------------------
# What each mode stores, per critic kind.
# ------------------------------------------------------------------------------------------------------


CRITICS = [("head", "step_gae", "step"), ("separate", "token_gae", "token")]


def _critic_config(kind: str, estimator: str, whiten: str) -> train.UpdateConfig:
  return dataclasses.replace(UPDATE, credit=credit.CreditConfig(estimator, whiten=whiten),
                             value=ValueConfig(kind=kind), kl_coef=0.05)


@pytest.mark.parametrize("kind,estimator,whiten", CRITICS)
@pytest.mark.parametrize("model,state_dtype,params_dtype,moments_dtype", [
    (F32, "float32", "float32", "float32"),
    (F32, None, "float32", "float32"),
    (BF16_COMPUTE, "float32", "float32", "float32"),
    (BF16_PARAMS, "float32", "bfloat16", "float32"),
    (BF16_PARAMS, None, "bfloat16", "bfloat16"),
])
def test_state_dtypes(kind, estimator, whiten, model, state_dtype, params_dtype, moments_dtype):
  """Abstract (nothing allocated): params, the critic's included, in the storage dtype; both Adam moments of both
  labels (actor, critic) in the optimizer's dtype; the reference copy stored like the policy."""
  optim = dataclasses.replace(OPTIM, state_dtype=state_dtype)
  state = abstract_state(train.StateSpec.for_update(model, _critic_config(kind, estimator, whiten), optim))
  assert _floating_dtypes(state.params) == _floating_dtypes(state.ref_params) == {params_dtype}
  assert "critic" not in state.params or _floating_dtypes(state.params["critic"]) == {params_dtype}
  adam = [s.inner_state[0] for s in state.opt_state[1].inner_states.values()]  # (clip, multi_transform)
  assert len(adam) == 2 and all(_floating_dtypes(a.mu) == _floating_dtypes(a.nu) == {moments_dtype} for a in adam)


@pytest.mark.parametrize("kind,estimator,whiten", CRITICS)
def test_bf16_params_update_with_a_critic(kind, estimator, whiten):
  """The whole update traces with bfloat16 params and a critic, and hands back a state of the same dtypes (traced,
  not compiled: the runs above compare the numbers)."""
  config = _critic_config(kind, estimator, whiten)
  spec = train.StateSpec.for_update(BF16_PARAMS, config, OPTIM)
  state = abstract_state(spec)
  new_state, metrics = jax.eval_shape(lambda s, b: update_step(spec, config, s, b), state, _inputs(0)[1])
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
  assert {"value_loss", "kl"} <= set(metrics) and _floating_dtypes(metrics) == {"float32"}


def test_float32_moments_keep_their_shardings(eight_devices):
  """The float32 casts see through the logical-axis boxes: bfloat16 params' moments shard like the params."""
  mesh, rules = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), sharding.get_rules("fsdp_tp")
  shardings = train.train_state_shardings(BF16_PARAMS, UPDATE, OPTIM, mesh, rules)
  mu = shardings.opt_state[1].inner_states["actor"].inner_state[0].mu
  kernel = shardings.params["policy"]["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert mu["policy"]["layers_0"]["mlp"]["up_proj"]["kernel"].spec == kernel.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")


def test_default_optimizer_program_is_unchanged():
  """With float32 params the float32 wrapper traces no op: the default optimizer is the program it was before
  `state_dtype` existed (which state_dtype=None still returns: clip, then AdamW per label)."""
  config = train.OptimConfig()
  params = {"policy": {"w": jnp.ones((4, 4)), "b": jnp.zeros((4,))}, "critic": {"value_head": {"k": jnp.ones((4,))}}}
  plain = train.make_optimizer(dataclasses.replace(config, state_dtype=None))
  wrapped = train.make_optimizer(config)
  for tx in (plain, wrapped):
    assert _floating_dtypes(tx.init(params)) == {"float32"}
  jaxprs = [str(jax.make_jaxpr(tx.update)(params, tx.init(params), params)) for tx in (plain, wrapped)]
  assert jaxprs[0] == jaxprs[1]


def test_state_dtype_errors():
  with pytest.raises(ValueError, match=r"^optim.state_dtype: unknown 'bfloat16'; allowed: float32, None \(None: the "
                     r"Adam moments follow the params' dtype\)$"):
    train.OptimConfig(state_dtype="bfloat16")


# ------------------------------------------------------------------------------------------------------
# Remat through the update.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remat", [True, "dots_with_no_batch_dims_saveable"])
def test_remat_update_equals_plain(remat):
  model = F32.replace(remat=remat)
  # The update's program really recomputes the block, under the named policy (equal numbers alone would also pass
  # if the update ignored the config).
  spec = train.StateSpec.for_update(model, UPDATE, OPTIM)
  state0 = jax.tree.map(jnp.asarray, _initial_state(F32, OPTIM, 0))
  jaxpr = str(jax.make_jaxpr(lambda s, b: update_step(spec, UPDATE, s, b))(state0, _inputs(0)[1]))
  policies = set(re.findall(r"policy=(\w+)", jaxpr))
  assert policies == ({"None"} if remat is True else {"DotsSaveable"})
  start, plain, plain_losses = _run(F32, 0)
  _, rematted, remat_losses = _run(model, 0, F32)
  np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_flat(rematted.params), _flat(plain.params), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_flat(rematted.opt_state), _flat(plain.opt_state), rtol=1e-6, atol=1e-7)
  assert np.linalg.norm(_flat(plain.params) - _flat(start.params)) > 0.1
