"""stepjax.losses against plain numpy references on ragged random batches.

Every value test calls the functions under `jax.jit`; the bad-input tests raise while tracing under `jax.jit`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import losses
from stepjax.testing import random_episode_batch

B, L, S = 8, 48, 5  # one shape for every batch-level test keeps the number of compilations small


def make_case(seed, noise=0.5, batch_shape=(B, L, S)):
  """A ragged batch (with empty rows) plus logp = old + noise, random token advantages and garbage off the mask."""
  batch = random_episode_batch(seed, *batch_shape)
  rng = np.random.default_rng(seed + 100)
  mask = batch.action_mask
  old = batch.logprobs.astype(np.float32)
  logp = np.where(mask, old + noise * rng.normal(size=old.shape), np.nan).astype(np.float32)  # garbage off the mask
  adv = np.where(mask, rng.normal(size=old.shape), np.nan).astype(np.float32)
  return batch, logp, old, adv


def units_of(name, mask, step_ids, step_mask):
  """The ratio units as (row, token positions): one per action token for ppo, one per valid step otherwise."""
  if name == "ppo":
    return [(b, np.array([l])) for b, l in zip(*np.nonzero(mask))]
  return [(b, np.nonzero(mask[b] & (step_ids[b] == t))[0]) for b, t in zip(*np.nonzero(step_mask))]


def np_aggregate(loss_tokens, mask, step_ids, step_mask, mode):
  loss_tokens = np.where(mask, loss_tokens, 0.0).astype(np.float64)
  if mode == "token-mean":
    return loss_tokens.sum() / max(mask.sum(), 1)
  if mode == "step-mean":
    per_step = [loss_tokens[b][mask[b] & (step_ids[b] == t)].mean() for b, t in zip(*np.nonzero(step_mask))]
    return float(np.mean(per_step)) if per_step else 0.0
  per_row = []
  for b in range(mask.shape[0]):
    if mask[b].any():
      total = loss_tokens[b].sum()
      per_row.append(total / mask[b].sum() if mode == "seq-mean-token-mean" else total)
  return float(np.mean(per_row)) if per_row else 0.0


def np_policy_loss(name, logp, old, adv, mask, step_ids, step_mask, *, clip_low, clip_high, dual_clip, agg_mode,
                   log_ratio_clamp=20.0):
  """Unit by unit: ratio, clipped surrogate, broadcast to tokens, then aggregate."""
  loss_tokens = np.zeros(logp.shape)
  ratios, clipped, dual = [], [], []
  for b, pos in units_of(name, mask, step_ids, step_mask):
    token_log_ratio = logp[b, pos].astype(np.float64) - old[b, pos]
    log_ratio = token_log_ratio.mean() if name == "gspo" else token_log_ratio.sum()
    ratio = np.exp(np.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp))
    a = adv[b, pos].astype(np.float64).mean()
    plain, clip = -a * ratio, -a * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    unit_loss = max(plain, clip)
    is_dual = dual_clip is not None and a < 0 and unit_loss > -a * dual_clip
    if is_dual:
      unit_loss = -a * dual_clip
    loss_tokens[b, pos] = unit_loss
    ratios.append(ratio)
    clipped.append(clip > plain)
    dual.append(is_dual)
  metrics = {"ratio_mean": np.mean(ratios), "ratio_min": np.min(ratios), "ratio_max": np.max(ratios),
             "clip_frac": np.mean(clipped), "dual_clip_frac": np.mean(dual),
             "approx_kl": np.mean((old - logp)[mask])}
  return np_aggregate(loss_tokens, mask, step_ids, step_mask, agg_mode), metrics


def policy_args(batch, logp, old, adv):
  return logp, old, adv, batch.action_mask, batch.step_ids, batch.step_mask


# ------------------------------------------------------------------------------------------------------
# Compilation dominates this file's run time (about a second per jit on a small shared CPU), so each jitted function
# below computes every variant a test needs at once (XLA shares their common work) and is built once per module.
# ------------------------------------------------------------------------------------------------------


@functools.cache
def agg_all_modes():
  """jit: (values, action_mask, step_ids, step_mask) -> {mode: (aggregate, d aggregate / d values)}."""

  def fn(values, mask, step_ids, step_mask):
    return {mode: jax.value_and_grad(lambda v, mode=mode: losses.aggregate(v, mask, step_ids, step_mask, mode))(values)
            for mode in losses.AGG_MODES}

  return jax.jit(fn)


# Dual clipping acts before aggregation, so it need not be crossed with every mode.
POLICY_VARIANTS = [(mode, 1.25) for mode in losses.AGG_MODES] + [("token-mean", None), ("step-mean", None)]


@functools.cache
def policy_all_variants(name):
  """jit: (clip_low, clip_high, logp, old_logp, advantages, action_mask, step_ids, step_mask) -> {"mode|dual":
  (loss, metrics)}, through the `policy_loss(config, ...)` entry point with traced clip values."""

  def fn(clip_low, clip_high, *args):
    out = {}
    for mode, dual in POLICY_VARIANTS:
      config = losses.PolicyLossConfig(name=name, clip_low=clip_low, clip_high=clip_high, dual_clip=dual,
                                       agg_mode=mode)
      out[f"{mode}|{dual}"] = losses.policy_loss(config, *args)
    return out

  return jax.jit(fn)


# ------------------------------------------------------------------------------------------------------
# Aggregation.
# ------------------------------------------------------------------------------------------------------


def hand_aggregation_case():
  """Row 0: a 4-token step of loss 1 and a 1-token step of loss 0; the other rows are empty."""
  mask, step_ids, step_mask = np.zeros((B, L), bool), np.full((B, L), -1, np.int32), np.zeros((B, S), bool)
  mask[0, :7] = [False, True, True, True, True, False, True]
  step_ids[0, :7] = [-1, 0, 0, 0, 0, -1, 1]
  step_mask[0, :2] = True
  values = np.zeros((B, L), np.float32)
  values[0, 1:5] = 1.0
  return values, mask, step_ids, step_mask


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_matches_numpy(mode):
  for seed in (0, 4):
    batch = random_episode_batch(seed, B, L, S)
    assert not batch.action_mask.any(axis=1).all(), "the batch should hold an empty row"
    values = np.random.default_rng(seed).normal(size=(B, L)).astype(np.float32)
    values = np.where(batch.action_mask, values, np.nan)  # off-mask values must not leak
    got, grad = agg_all_modes()(values, batch.action_mask, batch.step_ids, batch.step_mask)[mode]
    want = np_aggregate(values, batch.action_mask, batch.step_ids, batch.step_mask, mode)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grad)[~batch.action_mask] == 0.0)


def test_aggregate_modes_weigh_differently():
  """Long step of loss 1, short step of loss 0: tokens say 4/5, the row's sum says 4, steps say 1/2."""
  got = agg_all_modes()(*hand_aggregation_case())
  want = {"token-mean": 0.8, "seq-mean-token-mean": 0.8, "seq-mean-token-sum": 4.0, "step-mean": 0.5}
  for mode, value in want.items():
    assert float(got[mode][0]) == pytest.approx(value, rel=1e-6), mode


def test_aggregate_empty_mask_is_zero_with_zero_grad():
  no_tokens, no_ids, no_steps = np.zeros((B, L), bool), np.full((B, L), -1, np.int32), np.zeros((B, S), bool)
  for mode, (value, grad) in agg_all_modes()(np.ones((B, L), np.float32), no_tokens, no_ids, no_steps).items():
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0), mode


# ------------------------------------------------------------------------------------------------------
# Policy losses.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(losses.POLICY_LOSSES))
def test_policy_loss_matches_numpy(name):
  batch, logp, old, adv = make_case(0)
  results = policy_all_variants(name)(0.2, 0.28, *policy_args(batch, logp, old, adv))
  dual_fracs = []
  for mode, dual in POLICY_VARIANTS:
    loss, metrics = results[f"{mode}|{dual}"]
    want, want_metrics = np_policy_loss(name, logp, old, adv, batch.action_mask, batch.step_ids, batch.step_mask,
                                        clip_low=0.2, clip_high=0.28, dual_clip=dual, agg_mode=mode)
    where = f"{name} {mode} dual_clip={dual}"
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6, err_msg=where)
    for key, value in want_metrics.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{where} {key}")
    np.testing.assert_allclose(metrics["clip_frac"], metrics["clip_frac_low"] + metrics["clip_frac_high"], rtol=1e-6)
    assert 0 < want_metrics["clip_frac"] < 1, "the case should clip some units and not others"
    dual_fracs.append(want_metrics["dual_clip_frac"])
  assert max(dual_fracs) > 0, "the case should exercise the dual clip"


@pytest.mark.parametrize("name", list(losses.POLICY_LOSSES))
def test_identical_policies_give_unit_ratios_and_no_clipping(name):
  batch, _, old, adv = make_case(4)
  results = policy_all_variants(name)(0.2, 0.2, *policy_args(batch, old, old, adv))
  unit_adv = np.zeros((B, L))
  for b, pos in units_of(name, batch.action_mask, batch.step_ids, batch.step_mask):
    unit_adv[b, pos] = adv[b, pos].mean()
  for mode, dual in POLICY_VARIANTS:
    loss, metrics = results[f"{mode}|{dual}"]
    for key in ("ratio_mean", "ratio_min", "ratio_max"):
      assert float(metrics[key]) == pytest.approx(1.0, abs=1e-6), (mode, key)
    for key in ("clip_frac", "dual_clip_frac", "approx_kl"):
      assert float(metrics[key]) == 0.0, (mode, key)
    # With r = 1 the loss is minus the aggregated unit advantage.
    want = np_aggregate(-unit_adv, batch.action_mask, batch.step_ids, batch.step_mask, mode)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7, err_msg=mode)


def test_policy_losses_on_an_empty_batch_are_zero():
  no_tokens, no_ids, no_steps = np.zeros((B, L), bool), np.full((B, L), -1, np.int32), np.zeros((B, S), bool)
  garbage = np.full((B, L), np.nan, np.float32)  # nothing may be read off the mask
  for name in losses.POLICY_LOSSES:
    for variant, (loss, metrics) in policy_all_variants(name)(0.2, 0.2, garbage, garbage, garbage, no_tokens,
                                                              no_ids, no_steps).items():
      assert float(loss) == 0.0, (name, variant)
      assert {k: float(v) for k, v in metrics.items() if k.startswith("ratio")} == {
          "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}
      assert all(float(v) == 0.0 for k, v in metrics.items() if not k.startswith("ratio")), (name, variant)


def test_step_ratios_are_geometric_mean_and_product_of_token_ratios():
  batch, logp, old, _ = make_case(0, noise=0.2)
  both = jax.jit(lambda *a: [losses.step_log_ratios(*a, reduce=r) for r in ("mean", "sum")])
  geometric, product = np.exp(both(logp, old, batch.action_mask, batch.step_ids, batch.step_mask))
  for b, t in np.ndindex(B, S):
    pos = batch.action_mask[b] & (batch.step_ids[b] == t)
    token_ratios = np.exp(logp[b, pos].astype(np.float64) - old[b, pos])
    if batch.step_mask[b, t]:
      np.testing.assert_allclose(geometric[b, t], np.prod(token_ratios) ** (1 / len(token_ratios)), rtol=1e-5)
      np.testing.assert_allclose(product[b, t], np.prod(token_ratios), rtol=1e-5)
    else:
      assert geometric[b, t] == product[b, t] == 1.0  # log-ratio 0 on invalid steps
  # The losses' ratio metrics read the same per-step ratios.
  valid = batch.step_mask
  for name, ratios in (("gspo", geometric), ("step_ratio", product)):
    results = policy_all_variants(name)(0.2, 0.2, *policy_args(batch, logp, old, np.zeros_like(old)))
    metrics = results["step-mean|None"][1]
    np.testing.assert_allclose([metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"]],
                               [ratios[valid].mean(), ratios[valid].min(), ratios[valid].max()], rtol=1e-5)


def test_policy_gradients_stay_on_action_tokens_and_gspo_reaches_every_token_of_a_step():
  batch, logp, old, adv = make_case(4, noise=1e-4)  # |log-ratio| well inside the clip range: nothing is clipped
  args = policy_args(batch, logp, old, adv)[1:]

  @jax.jit
  def grads(x):
    return {name: jax.grad(lambda x, fn=fn: fn(x, *args, clip_low=0.2, clip_high=0.2)[0])(x)
            for name, fn in losses.POLICY_LOSSES.items()}

  all_grads = grads(logp)  # logp is NaN off the mask: the backward pass must not read it
  for name, grad in all_grads.items():
    grad = np.asarray(grad)
    assert np.all(grad[~batch.action_mask] == 0.0) and np.all(np.isfinite(grad)), name
    assert np.all(grad[batch.action_mask] != 0.0), name
  gspo_grad = np.asarray(all_grads["gspo"])
  num_tokens = batch.action_mask.sum()
  for b, pos in units_of("gspo", batch.action_mask, batch.step_ids, batch.step_mask):
    ratio = np.exp(np.mean(logp[b, pos].astype(np.float64) - old[b, pos]))
    # token-mean: loss = sum_steps n_s (-s A_s) / N, and ds/dlogp_i = s / n_s for each of the step's tokens.
    np.testing.assert_allclose(gspo_grad[b, pos], -adv[b, pos].mean() * ratio / num_tokens, rtol=1e-4)


@jax.jit
def single_token_results(log_ratios, advantages):
  """Each case: one row, one action token at position 1 (step 0). Vmapped over cases: -> {"name|dual": (loss,
  d loss / d logp at the token, metrics)}."""

  def per_case(log_ratio, advantage):
    mask = jnp.array([[False, True, False]])
    step_ids = jnp.array([[-1, 0, -1]], jnp.int32)
    old = jnp.array([[0.0, -1.0, 0.0]])
    logp = old + jnp.array([[0.0, 1.0, 0.0]]) * log_ratio
    adv = jnp.array([[0.0, 1.0, 0.0]]) * advantage
    out = {}
    for name, fn in losses.POLICY_LOSSES.items():
      for dual in (None, 3.0):
        loss_fn = functools.partial(fn, clip_low=0.2, clip_high=0.2, dual_clip=dual)
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp, old, adv, mask, step_ids,
                                                                          jnp.array([[True]]))
        out[f"{name}|{dual}"] = (loss, grad[0, 1], metrics)
    return out

  return jax.vmap(per_case)(log_ratios, advantages)


def test_dual_clip_caps_negative_advantages_and_the_log_ratio_is_clamped():
  big = np.log(8.0)  # ratio 8 > dual clip 3
  cases = [  # (log-ratio, A, (loss, grad) without dual clip, (loss, grad) with dual clip 3)
      (big, -1.0, (8.0, 8.0), (3.0, 0.0)),  # -rA = 8 is capped at -cA = 3, and the gradient vanishes
      (np.log(2.0), -1.0, (2.0, 2.0), (2.0, 2.0)),  # under the cap: untouched
      (big, 1.0, (-1.2, 0.0), (-1.2, 0.0)),  # A > 0: ordinary upper clip, dual clip irrelevant
      (50.0, -1.0, (np.exp(20.0), 0.0), (3.0, 0.0)),  # log-ratio clamped at 20: finite loss, no gradient
  ]
  results = single_token_results(np.array([c[0] for c in cases]), np.array([c[1] for c in cases]))
  for name in losses.POLICY_LOSSES:  # with a single token per step the three ratios coincide
    for dual, column in ((None, 2), (3.0, 3)):
      loss, grad, metrics = results[f"{name}|{dual}"]
      np.testing.assert_allclose(loss, [c[column][0] for c in cases], rtol=1e-5, err_msg=f"{name} {dual}")
      np.testing.assert_allclose(grad, [c[column][1] for c in cases], rtol=1e-5, atol=1e-6, err_msg=f"{name} {dual}")
      want_dual_frac = [1.0, 0.0, 0.0, 1.0] if dual else [0.0] * 4
      np.testing.assert_array_equal(metrics["dual_clip_frac"], want_dual_frac)
      np.testing.assert_array_equal(metrics["log_ratio_clamp_frac"], [0.0, 0.0, 0.0, 1.0])


def test_config_defaults_follow_the_reference_and_sweep_under_vmap():
  assert losses.PolicyLossConfig().name == "gspo"
  assert losses.PolicyLossConfig().clip_range() == (3e-4, 4e-4)
  assert losses.PolicyLossConfig(name="ppo").clip_range() == (0.2, 0.2)
  assert losses.PolicyLossConfig(name="step_ratio").clip_range() == (0.2, 0.2)
  assert losses.PolicyLossConfig(name="ppo", clip_high=0.28).clip_range() == (0.2, 0.28)
  batch, logp, old, adv = make_case(0)
  args = policy_args(batch, logp, old, adv)
  clip_highs = np.array([0.1, 0.28, 0.5], np.float32)
  # The config is a pytree whose numbers are leaves: a sweep vmaps over them with one compilation.
  sweep = losses.PolicyLossConfig(name="ppo", clip_low=np.full(3, 0.2, np.float32), clip_high=clip_highs,
                                  log_ratio_clamp=np.full(3, 20.0, np.float32))
  swept = jax.jit(jax.vmap(lambda config: losses.policy_loss(config, *args)[0]))(sweep)
  for i, clip_high in enumerate(clip_highs):
    want, _ = np_policy_loss("ppo", *args, clip_low=0.2, clip_high=float(clip_high), dual_clip=None,
                             agg_mode="token-mean")
    np.testing.assert_allclose(swept[i], want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Gradients vs central finite differences (float64, scoped to one computation).
# ------------------------------------------------------------------------------------------------------

GRADIENT_CASES = {
    "ppo": lambda x, old, adv, m, ids, sm: losses.ppo_loss(x, old, adv, m, ids, sm, dual_clip=1.5)[0],
    "gspo": lambda x, old, adv, m, ids, sm: losses.gspo_loss(x, old, adv, m, ids, sm, clip_low=0.1, clip_high=0.1,
                                                             agg_mode="step-mean")[0],
    "step_ratio": lambda x, old, adv, m, ids, sm: losses.step_ratio_loss(x, old, adv, m, ids, sm, dual_clip=2.0,
                                                                         agg_mode="seq-mean-token-mean")[0],
    "kl_low_var": lambda x, old, adv, m, ids, sm: losses.kl_loss(x, old, m, ids, sm, agg_mode="seq-mean-token-sum")[0],
    "kl_k2": lambda x, old, adv, m, ids, sm: losses.kl_loss(x, old, m, kind="k2")[0],
    "value_clipped": lambda x, old, adv, m, ids, sm: losses.value_loss(x, adv, m, old_values=old, clip_eps=0.3)[0],
}


@functools.cache
def gradients_and_finite_differences(eps=1e-6):
  """{case: (jax.grad, central differences)} at one tiny float64 point, plus the action mask."""
  batch = random_episode_batch(1, 2, 20, 3, fill=True)
  rng = np.random.default_rng(7)
  mask = batch.action_mask
  old = np.where(mask, -rng.exponential(1.0, mask.shape), 0.0)
  logp = np.where(mask, old + 0.4 * rng.normal(size=mask.shape), 0.0)
  adv = np.where(mask, rng.normal(size=mask.shape), 0.0)
  directions = np.eye(logp.size).reshape((logp.size,) + logp.shape)
  steps = np.concatenate([directions, -directions]) * eps  # +eps then -eps along every coordinate

  def all_cases(x):
    out = {}
    for case, fn in GRADIENT_CASES.items():
      loss_fn = lambda x, fn=fn: fn(x, old, adv, mask, batch.step_ids, batch.step_mask)
      plus, minus = jnp.split(jax.vmap(loss_fn)(x + steps), 2)
      numeric = (plus - minus) / (2 * eps)
      out[case] = (jax.grad(loss_fn)(x), numeric.reshape(x.shape), loss_fn(x).dtype == jnp.float64)
    return out

  with jax.enable_x64(True):  # scoped: other tests (and files) keep float32
    results = jax.tree_util.tree_map(np.asarray, jax.jit(all_cases)(logp))
  return results, mask


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradient_matches_finite_differences(case):
  results, mask = gradients_and_finite_differences()
  grad, numeric, is_float64 = results[case]
  assert is_float64
  np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
  assert np.abs(grad[mask]).max() > 1e-3 and np.all(grad[~mask] == 0.0)


# ------------------------------------------------------------------------------------------------------
# Value losses.
# ------------------------------------------------------------------------------------------------------


def np_value_loss(pred, returns, mask, old=None, clip_eps=None):
  pred, returns = pred[mask].astype(np.float64), returns[mask].astype(np.float64)
  squared = (pred - returns) ** 2
  clip_frac = 0.0
  if clip_eps is not None:
    old = old[mask]
    squared_clipped = (old + np.clip(pred - old, -clip_eps, clip_eps) - returns) ** 2
    clip_frac = np.mean(squared_clipped > squared)
    squared = np.maximum(squared, squared_clipped)
  explained = 1 - np.var(returns - pred) / np.var(returns)
  return 0.5 * squared.mean(), {"vf_clip_frac": clip_frac, "explained_variance": explained,
                                "value_mean": pred.mean(), "return_mean": returns.mean()}


@jax.jit
def value_variants(batch, position_values, step_returns, step_old, token_returns, token_old):
  out = {}
  for clip_eps in (None, 0.2):
    out[f"step|{clip_eps}"] = losses.step_value_loss(batch, position_values, step_returns, old_values=step_old,
                                                     clip_eps=clip_eps)
    out[f"token|{clip_eps}"] = losses.token_value_loss(batch, position_values, token_returns, old_values=token_old,
                                                       clip_eps=clip_eps)
  return out


def test_step_and_token_value_losses_match_numpy():
  batch = random_episode_batch(0, B, L, S)
  rng = np.random.default_rng(1)
  position_values = rng.normal(size=(B, L)).astype(np.float32)
  # Step critic: V(s_t) read at step_start - 1. Token critic: the value before each action token, read at p - 1.
  step_pred = np.where(batch.step_mask, position_values[np.arange(B)[:, None], batch.step_start - 1], 0.0)
  token_pred = np.where(batch.action_mask, np.pad(position_values, ((0, 0), (1, 0)))[:, :-1], 0.0)
  step_returns = (step_pred + rng.normal(size=(B, S))).astype(np.float32)
  step_old = (step_pred + 0.3 * rng.normal(size=(B, S))).astype(np.float32)
  token_returns = (token_pred + rng.normal(size=(B, L))).astype(np.float32)
  token_old = (token_pred + 0.3 * rng.normal(size=(B, L))).astype(np.float32)
  results = value_variants(batch, position_values, step_returns, step_old, token_returns, token_old)
  cases = {"step": (step_pred, step_returns, batch.step_mask, step_old),
           "token": (token_pred, token_returns, batch.action_mask, token_old)}
  for kind, (pred, returns, mask, old) in cases.items():
    for clip_eps in (None, 0.2):
      loss, metrics = results[f"{kind}|{clip_eps}"]
      want, want_metrics = np_value_loss(pred, returns, mask, old, clip_eps)
      np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"{kind} {clip_eps}")
      for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{kind} {clip_eps} {key}")
      if clip_eps is not None:
        assert 0 < want_metrics["vf_clip_frac"] < 1


def test_value_loss_edge_cases():
  value_fn = jax.jit(losses.value_loss)
  # Empty mask: 0, not NaN.
  loss, metrics = value_fn(jnp.ones((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3), bool))
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
  # A perfect critic explains all the variance; constant returns report 0 instead of dividing by 0.
  returns = np.array([[1.0, 2.0, 4.0]], np.float32)
  _, metrics = value_fn(returns, returns, np.ones((1, 3), bool))
  assert float(metrics["explained_variance"]) == pytest.approx(1.0)
  loss, metrics = value_fn(jnp.zeros((1, 3)), jnp.ones((1, 3)), jnp.ones((1, 3), bool))
  assert float(loss) == pytest.approx(0.5) and float(metrics["explained_variance"]) == 0.0


# ------------------------------------------------------------------------------------------------------
# KL, entropy, log-probs.
# ------------------------------------------------------------------------------------------------------


def np_kl(logp, ref, kind):
  diff = logp.astype(np.float64) - ref
  if kind in ("k1", "kl"):
    return diff
  if kind == "abs":
    return np.abs(diff)
  if kind in ("k2", "mse"):
    return 0.5 * diff ** 2
  log_ratio = np.clip(-diff, -20, 20)
  return np.clip(np.exp(log_ratio) - log_ratio - 1, -10, 10)


def test_kl_penalty_matches_numpy():
  rng = np.random.default_rng(2)
  logp = -rng.exponential(1.0, (B, L)).astype(np.float32)
  ref = (logp + rng.normal(size=(B, L)) * np.where(rng.random((B, L)) < 0.1, 30.0, 0.5)).astype(np.float32)
  results = jax.jit(lambda *a: {kind: losses.kl_penalty(*a, kind) for kind in losses.KL_KINDS})(logp, ref)
  for kind in losses.KL_KINDS:
    np.testing.assert_allclose(results[kind], np_kl(logp, ref, kind), rtol=1e-5, atol=1e-5, err_msg=kind)
  low_var = np.asarray(results["low_var_kl"])
  assert low_var.max() == pytest.approx(10.0) and low_var.min() >= 0.0  # the clamp is hit; k3 is never negative
  np.testing.assert_array_equal(results["k3"], low_var)


def test_kl_loss_aggregates_over_action_tokens():
  batch, logp, ref, _ = make_case(4)
  results = jax.jit(lambda *a: {mode: losses.kl_loss(*a, agg_mode=mode) for mode in losses.AGG_MODES})(
      logp, ref, batch.action_mask, batch.step_ids, batch.step_mask)
  per_token = np_kl(logp, ref, "low_var_kl")
  for mode in losses.AGG_MODES:
    loss, metrics = results[mode]
    want = np_aggregate(per_token, batch.action_mask, batch.step_ids, batch.step_mask, mode)
    np.testing.assert_allclose([loss, metrics["kl"], metrics["kl_max"]],
                               [want, want, per_token[batch.action_mask].max()], rtol=1e-5, err_msg=mode)


def np_log_softmax(logits):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@jax.jit
def logit_functions(logits, logits_bf16, tokens):
  return {"entropy": losses.entropy_from_logits(logits),
          "entropy_grad": jax.grad(lambda z: losses.entropy_from_logits(z).sum())(logits),
          "logprobs": losses.logprobs_from_logits(logits, tokens),
          "shifted_logprobs": losses.shifted_logprobs(logits, tokens),
          "shifted_entropy": losses.shifted_entropy(logits),
          "entropy_bf16": losses.entropy_from_logits(logits_bf16)}


def test_entropy_and_logprobs_match_numpy():
  rng = np.random.default_rng(3)
  logits = (5 * rng.normal(size=(2, 6, 11))).astype(np.float32)
  logits[0, 1, 3:] = -np.inf  # a masked vocabulary
  logits[1, 2] += 1e4  # large logits must stay accurate
  tokens = rng.integers(0, 3, size=(2, 6)).astype(np.int32)
  got = logit_functions(logits, logits.astype(jnp.bfloat16), tokens)
  log_p = np_log_softmax(logits)
  probs = np.exp(log_p)
  entropy = -np.sum(probs * np.where(probs > 0, log_p, 0.0), axis=-1)
  np.testing.assert_allclose(got["entropy"], entropy, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(got["entropy_grad"])))
  np.testing.assert_allclose(got["logprobs"], np.take_along_axis(log_p, tokens[..., None], -1)[..., 0], rtol=1e-5,
                             atol=1e-5)
  # Shift convention: the token at p is scored by the logits at p - 1; position 0 scores nothing.
  shifted = np.zeros((2, 6))
  for p in range(1, 6):
    shifted[:, p] = log_p[np.arange(2), p - 1, tokens[:, p]]
  np.testing.assert_allclose(got["shifted_logprobs"], shifted, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["shifted_entropy"], np.pad(entropy[:, :-1], ((0, 0), (1, 0))), rtol=1e-5, atol=1e-5)
  # bf16 logits are upcast: a float32 result, close to the float32 entropy of the rounded logits.
  assert got["entropy_bf16"].dtype == jnp.float32
  np.testing.assert_allclose(got["entropy_bf16"][0], entropy[0], atol=0.1)


# ------------------------------------------------------------------------------------------------------
# Bad input: one line naming the argument, at trace time.
# ------------------------------------------------------------------------------------------------------

_BATCH, _LOGP, _OLD, _ADV = make_case(0)
_MASK, _IDS, _STEPS = _BATCH.action_mask, _BATCH.step_ids, _BATCH.step_mask
_POLICY = (_LOGP, _OLD, _ADV, _MASK, _IDS, _STEPS)


def _replace(args, index, value):
  return args[:index] + (value,) + args[index + 1:]


BAD_INPUTS = {
    "old_logp shape": (losses.ppo_loss, _replace(_POLICY, 1, _OLD[:, :-1]), {}, "old_logp"),
    "advantages rank": (losses.gspo_loss, _replace(_POLICY, 2, _ADV[..., None]), {}, "advantages"),
    "logp dtype": (losses.ppo_loss, _replace(_POLICY, 0, np.zeros((B, L), np.int32)), {}, "logp"),
    "action_mask dtype": (losses.ppo_loss, _replace(_POLICY, 3, _MASK.astype(np.float32)), {}, "action_mask"),
    "step_ids dtype": (losses.step_ratio_loss, _replace(_POLICY, 4, _IDS.astype(np.float32)), {}, "step_ids"),
    "step_mask batch": (losses.gspo_loss, _replace(_POLICY, 5, np.ones((B + 1, S), bool)), {}, "step_mask"),
    "unknown agg_mode": (losses.ppo_loss, _POLICY, {"agg_mode": "mean"}, "agg_mode"),
    "negative clip_low": (losses.ppo_loss, _POLICY, {"clip_low": -0.1}, "clip_low"),
    "negative clip_high": (losses.gspo_loss, _POLICY, {"clip_high": -1e-4}, "clip_high"),
    "dual_clip <= 1": (losses.ppo_loss, _POLICY, {"dual_clip": 1.0}, "dual_clip"),
    "log_ratio_clamp <= 0": (losses.step_ratio_loss, _POLICY, {"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
    "unknown loss name": (lambda *a: losses.policy_loss(losses.PolicyLossConfig(name="grpo"), *a), _POLICY, {}, "name"),
    "config agg_mode": (lambda *a: losses.policy_loss(losses.PolicyLossConfig(agg_mode="sum"), *a), _POLICY, {},
                        "agg_mode"),
    "aggregate mode": (losses.aggregate, (_ADV, _MASK, _IDS, _STEPS), {"mode": "token-sum"}, "mode"),
    "step-mean without steps": (losses.aggregate, (_ADV, _MASK), {"mode": "step-mean"}, "step_ids"),
    "value returns shape": (losses.value_loss, (_ADV, _ADV[:, :3], _MASK), {}, "returns"),
    "value mask dtype": (losses.value_loss, (_ADV, _ADV, _MASK.astype(np.int32)), {}, "mask"),
    "clip_eps without old": (losses.value_loss, (_ADV, _ADV, _MASK), {"clip_eps": 0.2}, "old_values"),
    "negative clip_eps": (losses.value_loss, (_ADV, _ADV, _MASK), {"clip_eps": -0.2, "old_values": _ADV}, "clip_eps"),
    "step value returns": (losses.step_value_loss, (_BATCH, _ADV, _ADV), {}, "returns"),
    "position_values shape": (losses.token_value_loss, (_BATCH, _ADV[:, :4], _ADV), {}, "position_values"),
    "kl kind": (losses.kl_penalty, (_LOGP, _OLD), {"kind": "k4"}, "kind"),
    "kl ref shape": (losses.kl_loss, (_LOGP, _OLD.T, _MASK), {}, "ref_logp"),
    "logits dtype": (losses.entropy_from_logits, (np.zeros((2, 3, 4), np.int32),), {}, "logits"),
    "tokens shape": (losses.shifted_logprobs, (np.zeros((2, 3, 4), np.float32), np.zeros((2, 4), np.int32)), {},
                     "tokens"),
    "tokens dtype": (losses.logprobs_from_logits, (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3))), {}, "tokens"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
  fn, args, kwargs, argument = BAD_INPUTS[case]
  with pytest.raises(ValueError) as error:
    jax.jit(functools.partial(fn, **kwargs))(*args)  # raised while tracing, before anything compiles
  message = str(error.value)
  assert message.startswith(f"{argument}: ") and "\n" not in message, message


def test_get_policy_loss_and_config_validate():
  assert losses.get_policy_loss("step_ratio") is losses.step_ratio_loss
  assert losses.RATIO_UNITS == {"ppo": "token", "gspo": "step-mean", "step_ratio": "step-sum"}
  assert set(losses.RATIO_UNITS) == set(losses.POLICY_LOSSES) == set(losses.DEFAULT_CLIP)
  with pytest.raises(ValueError, match=r"^name: unknown 'grpo'; allowed: ppo, gspo, step_ratio$"):
    losses.get_policy_loss("grpo")
  with pytest.raises(ValueError, match=r"^dual_clip: must be > 1"):
    losses.PolicyLossConfig(name="ppo", dual_clip=0.5).validate()  # (construction already raises)


@pytest.mark.parametrize("kwargs,field", [
    ({"clip_low": 1.0}, "clip_low"), ({"clip_low": -0.1}, "clip_low"), ({"clip_high": -0.2}, "clip_high"),
    ({"dual_clip": 0.5}, "dual_clip"), ({"log_ratio_clamp": 0.0}, "log_ratio_clamp"), ({"name": "grpo"}, "name"),
    ({"agg_mode": "sum"}, "agg_mode"), ({"clip_low": np.array([0.1, 1.5], np.float32)}, "clip_low"),
])
def test_policy_loss_config_is_validated_on_construction(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}: ") as error:
    losses.PolicyLossConfig(**kwargs)
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=f"^{field}: "):  # replace rebuilds it, so it validates too
    losses.PolicyLossConfig().replace(**kwargs)


def test_policy_loss_config_survives_jit_vmap_and_tree_utilities():
  config = losses.PolicyLossConfig(name="ppo", clip_low=np.full(3, 0.2, np.float32),
                                   clip_high=np.array([0.1, 0.28, 0.5], np.float32),
                                   log_ratio_clamp=np.full(3, 20.0, np.float32))
  # Rebuilt with tracers (vmap, jit), placeholder objects (eval_shape), ints (an axis spec), device arrays.
  np.testing.assert_allclose(jax.jit(jax.vmap(lambda c: c.clip_range()[1] * 2))(config), [0.2, 0.56, 1.0], rtol=1e-6)
  assert jax.eval_shape(lambda c: c, config).clip_high.shape == (3,)
  axes = jax.tree_util.tree_map(lambda _: 0, config)  # clip_low = 0 ... log_ratio_clamp = 0 is an axis spec here
  np.testing.assert_allclose(jax.vmap(lambda c: c.clip_high, in_axes=(axes,))(config), config.clip_high)
  assert jax.jit(lambda c: c)(losses.PolicyLossConfig(clip_low=0.1)).clip_low == pytest.approx(0.1)
  # Device values and ints are not read on construction; `validate` (run by policy_loss) catches them.
  for unread, field in ((losses.PolicyLossConfig(log_ratio_clamp=jnp.float32(0.0)), "log_ratio_clamp"),
                        (losses.PolicyLossConfig(dual_clip=1), "dual_clip")):
    with pytest.raises(ValueError, match=f"^{field}: "):
      unread.validate()
