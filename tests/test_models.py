"""Transformer, KV cache, layouts (scan / remat / bf16 / sharded) and value models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax.models import (CACHE_AXES, Critic, KVCache, PolicyWithValue, Transformer, ValueConfig, add_value_head,
                            build_models, cache_logical_axes, forward, get_config, init_cache, init_models, init_params,
                            param_logical_axes, stack_layer_params, unstack_layer_params)
from stepjax.models.attention import causal_attention
from stepjax.testing import random_episode_batch

Array = jax.Array

# Every feature on: q/k/v bias (Qwen2), per-head q/k norm (Qwen3), untied LM head.
CONFIG = get_config("tiny", qkv_bias=True, qk_norm=True)
# Real (RNG) inits compile one RNG program per parameter, slow on CPU: use a micro config there.
MICRO = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                   head_dim=16, qkv_bias=True)
PARAM_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}

jit_forward = jax.jit(forward, static_argnums=0)


def random_params(model: nn.Module, seed: int, stddev: float = 0.08) -> dict:
  """Numpy-random params with the module's tree (fast: no RNG program to compile). Norm scales near 1."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    if path[-1].key == "scale":
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.asarray(stddev * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def params():
  return random_params(Transformer(CONFIG), 0)


def right_padded(rows: list[np.ndarray], width: int) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(head_dim=31), "head_dim"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="int32"), "dtype"),
    (dict(param_dtype="nonsense"), "param_dtype"),
    (dict(remat="save_everything_please"), "remat"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attention_block=-1), "attention_block"),
    (dict(not_a_field=1), "not_a_field"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"^{field}:"):
    get_config("tiny", **overrides)


def test_presets():
  with pytest.raises(ValueError, match=r"^model\.preset: unknown 'gpt5'; allowed: .*qwen3-8b"):
    get_config("gpt5")
  for name in ("tiny", "small", "llama3-8b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b"):
    get_config(name).validate()
  shapes = jax.eval_shape(lambda: init_params(get_config("small"), jax.random.key(0)))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 1e6 < num_params < 1e7
  assert get_config("qwen3-0.6b").tie_word_embeddings and get_config("qwen3-8b").qk_norm
  assert get_config("tiny", scan_layers=True, remat="dots_saveable").remat == "dots_saveable"


# --------------------------------------------------------------------------------------------------
# Forward and KV cache
# --------------------------------------------------------------------------------------------------


def test_forward_shapes_and_right_padding(params):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CONFIG.vocab_size, (2, 8)).astype(np.int32)
  logits, hidden, cache = jit_forward(CONFIG, params, tokens)
  assert logits.shape == (2, 8, CONFIG.vocab_size) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 8, CONFIG.hidden_size) and cache is None
  # Changing a later (pad) token leaves earlier positions untouched: right padding needs no mask.
  tokens2 = tokens.copy()
  tokens2[:, 6:] = 0
  logits2 = jit_forward(CONFIG, params, tokens2)[0]
  np.testing.assert_array_equal(logits[:, :6], logits2[:, :6])
  assert not np.allclose(logits[:, 6:], logits2[:, 6:])


def _numpy_causal_attention(q, k, v):
  """The textbook loop: every query row, softmax over the keys up to it (float64)."""
  b, t, h, dh = q.shape
  g = h // k.shape[2]
  out = np.zeros((b, t, h, dh))
  for i in range(b):
    for j in range(h):
      for row in range(t):
        s = k[i, :row + 1, j // g] @ q[i, row, j] / np.sqrt(dh)
        p = np.exp(s - s.max())
        out[i, row, j] = (p / p.sum()) @ v[i, :row + 1, j // g]
  return out


_attention = jax.jit(causal_attention, static_argnums=3)
_attention_grad = jax.jit(jax.grad(lambda q, k, v, w, block: jnp.sum(w * causal_attention(q, k, v, block)),
                                   argnums=(0, 1, 2)), static_argnums=4)


@pytest.mark.parametrize("t, block", [(1, 32), (13, 4), (16, 4), (16, 0), (37, 8)])
def test_causal_attention_in_query_blocks_matches_a_numpy_loop(t, block):
  rng = np.random.default_rng(t * 100 + block)
  q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, t, 2, 8)).astype(np.float32) for _ in range(2))
  out = np.asarray(_attention(q, k, v, block))
  np.testing.assert_allclose(out, _numpy_causal_attention(q, k, v), atol=2e-6, rtol=1e-5)
  # The gradient of the blocked form equals the plain (one-block) form's.
  w = rng.normal(size=q.shape).astype(np.float32)
  for blocked, plain in zip(_attention_grad(q, k, v, w, block), _attention_grad(q, k, v, w, 0)):
    np.testing.assert_allclose(blocked, plain, atol=2e-6, rtol=1e-5)


def test_model_forward_does_not_depend_on_the_attention_block(params):
  tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 24)).astype(np.int32)
  outs = [jit_forward(CONFIG.replace(attention_block=block), params, tokens)[0] for block in (0, 5, 32)]
  for other in outs[1:]:
    np.testing.assert_allclose(other, outs[0], atol=2e-5, rtol=1e-5)


def test_cache_prefill_decode_extend_matches_full_forward(params):
  """Ragged prefill, one-token decodes, a ragged multi-token extension (one row empty) and another decode give
  the logits of one full forward over the final sequences. Cache max_len 12 = the longest final row, so the
  padded tail of the extension runs past the cache end (those writes must be dropped, not clamped)."""
  rng = np.random.default_rng(2)
  draw = lambda n: rng.integers(1, CONFIG.vocab_size, n).astype(np.int32)
  prompt_lens, ext_lens = [5, 2, 7], [3, 0, 2]
  prompts = [draw(n) for n in prompt_lens]
  decode1, decode2, decode3 = draw(3), draw(3), draw(3)
  exts = [draw(n) for n in ext_lens]
  finals = [np.concatenate([prompts[b], decode1[b:b + 1], decode2[b:b + 1], exts[b], decode3[b:b + 1]])
            for b in range(3)]
  max_len = max(len(f) for f in finals)
  assert max_len == 12
  full = np.asarray(jit_forward(CONFIG, params, right_padded(finals, max_len))[0])

  cache = init_cache(CONFIG, 3, max_len)
  assert cache.k.shape == (CONFIG.num_layers, 3, max_len, CONFIG.num_kv_heads, CONFIG.head_dim)
  # Prefill through `trunk` then `logits` (how a sampler skips the LM head on positions it does not sample from).
  model = Transformer(CONFIG)
  hidden, cache = jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, None, c, n, method="trunk"))(
      params, right_padded(prompts, 7), cache, jnp.asarray(prompt_lens))
  logits = jax.jit(lambda p, h: model.apply({"params": p}, h, method="logits"))(params, hidden)
  for b, n in enumerate(prompt_lens):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)
  pos = np.array(prompt_lens)
  for tokens in (decode1, decode2):
    logits, _, cache = jit_forward(CONFIG, params, tokens[:, None], None, cache)
    np.testing.assert_allclose(logits[:, 0], full[np.arange(3), pos], atol=1e-5, rtol=1e-5)
    pos = pos + 1
  np.testing.assert_array_equal(cache.lengths, pos)
  logits, _, cache = jit_forward(CONFIG, params, right_padded(exts, 4), None, cache, jnp.asarray(ext_lens))
  for b, n in enumerate(ext_lens):
    np.testing.assert_allclose(logits[b, :n], full[b, pos[b]:pos[b] + n], atol=1e-5, rtol=1e-5)
  pos = pos + np.array(ext_lens)
  logits, _, cache = jit_forward(CONFIG, params, decode3[:, None], None, cache)
  np.testing.assert_allclose(logits[:, 0], full[np.arange(3), pos], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [len(f) for f in finals])


def test_cache_logical_axes():
  axes = cache_logical_axes()
  assert isinstance(axes, KVCache) and tuple(axes.k) == CACHE_AXES and tuple(axes.lengths) == ("cache_batch",)


# --------------------------------------------------------------------------------------------------
# Layouts: scan, remat, bf16, logical axes, sharded execution
# --------------------------------------------------------------------------------------------------


def _value_loss(model: nn.Module, params: dict, tokens: Array):
  logits, values, hidden, cache = model.apply({"params": params}, tokens)
  return jnp.sum(values ** 2), (logits, values, hidden, cache)


# Shared by the scan and the value-head tests so that each gradient program compiles once.
value_loss_grad = jax.jit(jax.grad(_value_loss, argnums=1, has_aux=True), static_argnums=0)


@pytest.fixture(scope="module")
def params_with_head(params):
  return add_value_head(params, jax.random.key(1))


def test_scan_and_remat_match_plain_stack(params, params_with_head):
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)
  scanned_config = CONFIG.replace(scan_layers=True, remat="dots_with_no_batch_dims_saveable")
  scanned = stack_layer_params(params, CONFIG.num_layers)
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, random_params(Transformer(scanned_config), 0))
  np.testing.assert_array_equal(unstack_layer_params(scanned)["layers_1"]["mlp"]["up_proj"]["kernel"],
                                params["layers_1"]["mlp"]["up_proj"]["kernel"])
  full = jit_forward(CONFIG, params, tokens)[0]
  np.testing.assert_allclose(jit_forward(scanned_config, scanned, tokens)[0], full, atol=1e-5, rtol=1e-5)

  # Gradients through the rematerialised scan equal those of the plain stack (value loss: it reaches every layer).
  grads, _ = value_loss_grad(PolicyWithValue(CONFIG), params_with_head, tokens)
  grads_s, _ = value_loss_grad(PolicyWithValue(scanned_config), stack_layer_params(params_with_head, 2), tokens)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(a))), rtol=1e-4)
  jax.tree.map(close, stack_layer_params(grads, CONFIG.num_layers), grads_s)

  # The KV cache through the scanned stack (the layer index travels in the scan carry): the second chunk needs
  # the first chunk's keys of every layer.
  cache = init_cache(scanned_config, 2, 8)
  _, _, cache = jit_forward(scanned_config, scanned, tokens[:, :4], None, cache)
  logits, _, cache = jit_forward(scanned_config, scanned, tokens[:, 4:], None, cache)
  np.testing.assert_allclose(logits, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_bf16_compute_stays_close(params):
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)
  bf16 = CONFIG.replace(dtype="bfloat16")
  logits, hidden, _ = jit_forward(CONFIG, params, tokens)
  logits16, hidden16, _ = jit_forward(bf16, params, tokens)
  assert logits16.dtype == jnp.float32 and hidden16.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(logits)))
  assert float(jnp.max(jnp.abs(logits16 - logits))) < 0.05 * scale
  cache = init_cache(bf16, 2, 8)
  assert cache.k.dtype == jnp.bfloat16
  cached, _, cache = jit_forward(bf16, params, tokens, None, cache)
  assert cache.k.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(cached - logits))) < 0.05 * scale


@pytest.mark.parametrize("module", [
    PolicyWithValue(CONFIG),
    Critic(get_config("tiny", tie_word_embeddings=True)),
    Transformer(get_config("tiny", scan_layers=True, remat=True)),
], ids=["policy_with_value", "critic_tied", "scanned"])
def test_every_param_has_logical_axes(module):
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_AXES | {None}, leaf.names
  specs = param_logical_axes(module)
  assert jax.tree.structure(specs) == jax.tree.structure(nn.unbox(boxed))
  if module.config.scan_layers:
    assert tuple(specs["layers"]["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")


RULES = (("activation_batch", "data"), ("cache_batch", "data"),
         ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
         ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_mlp", "tensor"),
         ("activation_vocab", "tensor"), ("cache_kv_heads", "tensor"),
         ("embed", None), ("head_dim", None), ("norm", None), ("layers", None), ("activation_length", None),
         ("activation_embed", None), ("cache_length", None), ("cache_head_dim", None))


@pytest.mark.usefixtures("eight_devices")  # tests/conftest.py
def test_sharded_forward_with_logical_rules(params):
  """Params sharded by the logical rules on a (data 4, tensor 2) mesh; the constrained forward (with a cache)
  compiles and gives the unsharded logits."""
  # Auto axes: the model places sharding *hints* (with_logical_constraint); Explicit axes would turn them into asserts.
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = nn.logical_to_mesh_sharding(param_logical_axes(CONFIG), mesh, RULES)
  sharded = jax.device_put(params, shardings)
  q_spec = sharded["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec
  assert tuple(q_spec) in (("", "tensor", ""), (None, "tensor", None), (None, "tensor"))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, CONFIG.vocab_size, (4, 8)), jnp.int32)
  # Unsharded reference in two halves: the (2, 8) forward is already compiled by other tests.
  expected = jnp.concatenate([jit_forward(CONFIG, params, tokens[:2])[0], jit_forward(CONFIG, params, tokens[2:])[0]])
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    cache = init_cache(CONFIG, 4, 8)
    logits, _, cache = jax.jit(forward, static_argnums=0)(CONFIG, sharded, tokens, None, cache)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [8] * 4)


# --------------------------------------------------------------------------------------------------
# Value models
# --------------------------------------------------------------------------------------------------


def test_policy_with_value_shares_the_trunk_and_stop_gradient_blocks_it(params, params_with_head):
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)
  head = params_with_head["value_head"]
  assert set(head) == {"kernel", "bias"} and head["kernel"].shape == (CONFIG.hidden_size,)
  blocked, (logits, values, hidden, cache) = value_loss_grad(PolicyWithValue(CONFIG, True), params_with_head, tokens)
  flowing, _ = value_loss_grad(PolicyWithValue(CONFIG), params_with_head, tokens)
  assert values.shape == (2, 8) and values.dtype == jnp.float32 and cache is None
  np.testing.assert_allclose(logits, jit_forward(CONFIG, params, tokens)[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(values, hidden @ head["kernel"] + head["bias"], atol=1e-5, rtol=1e-5)

  trunk_norm = lambda g: sum(float(jnp.sum(jnp.abs(x))) for k, v in g.items() if k != "value_head"
                             for x in jax.tree.leaves(v))
  assert trunk_norm(blocked) == 0.0 and trunk_norm(flowing) > 0.0
  assert float(jnp.sum(jnp.abs(blocked["value_head"]["kernel"]))) > 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), blocked["value_head"],
               flowing["value_head"])


def test_separate_critic_from_policy_and_from_scratch():
  config = MICRO
  policy_params = random_params(Transformer(config), 1)
  _, critic_params = init_models(config, ValueConfig("separate"), jax.random.key(0), policy_params)
  assert "lm_head" not in critic_params and "value_head" in critic_params
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, config.vocab_size, (2, 5)), jnp.int32)
  policy_module, critic_module = build_models(config, ValueConfig("separate"))
  assert isinstance(critic_module, Critic) and type(policy_module) is Transformer
  _, policy_hidden, _ = jax.jit(policy_module.apply)({"params": policy_params}, tokens)
  values, critic_hidden, _ = jax.jit(critic_module.apply)({"params": critic_params}, tokens)
  np.testing.assert_array_equal(critic_hidden, policy_hidden)  # the policy's trunk
  assert values.shape == (2, 5)
  # A copy, not an alias: the trees share no buffers.
  assert critic_params["embed"]["embedding"] is not policy_params["embed"]["embedding"]

  # From scratch: a real RNG init (an "rbg" key: threefry init programs compile slowly on CPU).
  fresh = init_models(config, ValueConfig("separate", init_from_policy=False), jax.random.key(0, impl="rbg"),
                      policy_params)[1]
  assert jax.tree.structure(fresh) == jax.tree.structure(critic_params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))
  assert not np.allclose(fresh["embed"]["embedding"], policy_params["embed"]["embedding"])
  np.testing.assert_array_equal(fresh["final_norm"]["scale"], np.ones(config.hidden_size))
  np.testing.assert_array_equal(fresh["layers_0"]["attn"]["q_proj"]["bias"], 0)
  assert 0.01 < float(jnp.std(fresh["layers_0"]["mlp"]["up_proj"]["kernel"])) < 0.03  # initializer_range 0.02

  assert init_models(config, ValueConfig(None), jax.random.key(0), policy_params)[1] is None
  with_head, none = init_models(config, ValueConfig("head"), jax.random.key(0), policy_params)
  assert none is None and "value_head" in with_head
  with pytest.raises(ValueError, match="^kind:"):
    ValueConfig("q-function").validate()


def test_step_values_from_one_packed_forward_equal_prefix_forwards(params_with_head):
  """Causality: V(s_t) read at step_start - 1 of the packed row equals the value of a forward over the prefix
  tokens[:step_start] alone (followed by junk that must not matter)."""
  batch = random_episode_batch(8, batch_size=3, max_len=24, max_steps=3, vocab_size=CONFIG.vocab_size, fill=True)
  batch.validate()
  values_fn = jax.jit(lambda tokens: PolicyWithValue(CONFIG).apply({"params": params_with_head}, tokens)[1])

  rng = np.random.default_rng(9)
  b_idx, t_idx = np.nonzero(np.asarray(batch.step_mask))
  prefixes = rng.integers(1, CONFIG.vocab_size, (len(b_idx), batch.max_len)).astype(np.int32)
  for r, (b, t) in enumerate(zip(b_idx, t_idx)):
    start = batch.step_start[b, t]
    prefixes[r, :start] = batch.tokens[b, :start]
  # One call, one fixed shape: the 3 packed rows, then one row per step.
  rows = np.zeros((12, batch.max_len), np.int32)
  rows[:3], rows[3:3 + len(prefixes)] = batch.tokens, prefixes
  values = np.asarray(values_fn(rows))
  step_values = np.asarray(batch.step_values(values[:3]))
  expected = values[3 + np.arange(len(b_idx)), batch.step_start[b_idx, t_idx] - 1]
  np.testing.assert_allclose(step_values[b_idx, t_idx], expected, atol=1e-5, rtol=1e-5)
  assert np.all(step_values[~np.asarray(batch.step_mask)] == 0)
