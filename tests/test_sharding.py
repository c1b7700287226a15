"""Meshes, rule tables and sharded jit on 8 fake CPU devices (XLA_FLAGS set by tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from stepjax import sharding

needs_8 = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py


class _LogicalMLP(nn.Module):
  """A small module that names logical axes the way the transformer does."""

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_embed"))
    w_in = self.param("w_in", nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", "mlp")), (16, 32))
    w_out = self.param("w_out", nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp", "embed")), (32, 16))
    h = nn.with_logical_constraint(jax.nn.silu(x @ w_in), ("activation_batch", "activation_mlp"))
    return h @ w_out


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sharding.resolve_mesh_shape({"data": 2, "tensor": 2}, 4) == {"data": 2, "fsdp": 1, "tensor": 2}
  for axes, n, message in [({"data": -1, "fsdp": -1}, 8, "at most one"), ({"data": 3}, 8, "multiply to 3"),
                           ({"data": -1, "fsdp": 3}, 8, "not divisible"), ({"model": 2}, 2, "unknown axis 'model'"),
                           ({"data": 0}, 1, "positive")]:
    with pytest.raises(ValueError, match=message):
      sharding.resolve_mesh_shape(axes, n)


def test_unknown_rule_table():
  with pytest.raises(ValueError, match="^sharding.rules: unknown 'zero3'; allowed: dp"):
    sharding.get_rules("zero3")


def test_single_device_mesh():
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@needs_8
@pytest.mark.parametrize("shape,rules", [((8, 1, 1), "dp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"),
                                         ((1, 1, 8), "tp")])
def test_sharded_loss_and_grads_match_one_device(shape, rules):
  model = _LogicalMLP()
  x = jax.random.normal(jax.random.key(0), (16, 16))
  params = nn.meta.unbox(model.init(jax.random.key(1), x))

  def loss(p, x):
    return jnp.mean(jnp.tanh(model.apply(p, x)) ** 2)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, x)

  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  table = sharding.get_rules(rules)
  sharded_params, param_shardings = sharding.sharded_init(model.init, mesh, table, jax.random.key(1), x)
  # The layout is what the rules declare.
  spec = {"dp": (None, None), "fsdp": ("fsdp", None), "tp": (None, "tensor"), "fsdp_tp": ("fsdp", "tensor")}[rules]
  assert sharded_params["params"]["w_in"].sharding.spec == P(*spec)
  assert sharded_params["params"]["w_out"].sharding.spec == P(*reversed(spec))
  assert sharded_params["params"]["w_in"].addressable_shards[0].data.shape == (
      16 // mesh.shape["fsdp"] if rules in ("fsdp", "fsdp_tp") else 16,
      32 // mesh.shape["tensor"] if rules in ("tp", "fsdp_tp") else 32)
  xs = sharding.shard_batch(x, mesh)
  assert xs.sharding.spec == P(("data", "fsdp"), None)
  step = sharding.jit_with_rules(jax.value_and_grad(loss), mesh, table,
                                in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                                out_shardings=(sharding.replicated(mesh), param_shardings))
  got_loss, got_grads = step(sharded_params, xs)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_grads, ref_grads)
  assert got_grads["params"]["w_in"].sharding.spec == P(*spec)


@needs_8
def test_batch_not_divisible_by_mesh():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  with pytest.raises(ValueError, match="batch_size: 12 is not divisible by the mesh's data x fsdp size 8"):
    sharding.shard_batch(np.zeros((12, 3)), mesh)


@needs_8
def test_host_local_to_global_single_process():
  mesh = sharding.make_mesh({"data": 8})
  x = np.arange(32, dtype=np.float32).reshape(16, 2)
  g = sharding.host_local_to_global({"x": x}, mesh)["x"]
  assert g.shape == (16, 2) and g.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(g), x)


@needs_8
@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_process_rows_and_local_single_process(shape):
  """One process holds every row; process_local reads a batch-split array (and its tensor-axis copies) back whole.
  (Two processes, each with half the rows: tests/multihost_worker.py.)"""
  mesh = sharding.make_mesh(shape)
  assert sharding.process_rows(16, mesh) == (0, 16)
  x = np.arange(48, dtype=np.int32).reshape(16, 3)
  np.testing.assert_array_equal(sharding.process_local(sharding.host_local_to_global(x, mesh)), x)


@needs_8
def test_transformer_logits_and_grads_on_meshes_match_one_device():
  """The real model on (8,1,1), (2,4,1) and (2,2,2) meshes: same logits and gradients as one device, and every
  parameter laid out as the rule table declares."""
  from stepjax.models import transformer

  config = transformer.get_config("tiny", dtype="float32", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  head_dim=16)
  model = transformer.Transformer(config)
  tokens = jax.random.randint(jax.random.key(2), (8, 24), 0, config.vocab_size)

  def loss(params, tokens):
    logits, _, _ = model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits

  init = lambda key: model.init(key, tokens)["params"]
  params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, tokens)
  table = sharding.get_rules("fsdp_tp")
  specs = sharding.logical_specs(jax.eval_shape(init, jax.random.key(0)))
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    sharded, param_shardings = sharding.sharded_init(init, mesh, table, jax.random.key(0))
    # Layout: what the rules say for every parameter (e.g. q_proj [embed, heads, head_dim] -> (fsdp, tensor, None)).
    expected = sharding.shardings_from_logical(specs, mesh, table)
    jax.tree_util.tree_map(lambda x, s: assert_same_spec(x.sharding, s, mesh), sharded, expected)
    q = sharded["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (64 // shape[1], 4 // shape[2], 16)
    step = sharding.jit_with_rules(jax.value_and_grad(loss, has_aux=True), mesh, table,
                                   in_shardings=(param_shardings, sharding.batch_sharding(mesh)))
    (got_loss, got_logits), got_grads = step(sharded, sharding.shard_batch(tokens, mesh))
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                           got_grads, ref_grads)


def assert_same_spec(actual, expected, mesh):
  """Two shardings agree up to trailing replicated axes."""
  strip = lambda spec: tuple(spec) + (None,) * (8 - len(spec))
  assert strip(actual.spec) == strip(expected.spec), (actual.spec, expected.spec)
