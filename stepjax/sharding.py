"""Meshes, logical-axis rules and the helpers that turn them into shardings for `jax.jit`.

Model code names only *logical* axes (`embed`, `heads`, `mlp`, `activation_batch`, ...). A rule table maps each
logical axis to mesh axes (`data`, `fsdp`, `tensor`) or to None (replicated), so moving from data parallelism
to FSDP or tensor parallelism is a change of rule table and mesh shape, not of model code:

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = get_rules("fsdp_tp")
    param_sharding = shardings_from_logical(logical_specs(abstract_boxed_params), mesh, rules)
    step = jit_with_rules(update, mesh, rules, in_shardings=..., out_shardings=..., donate_argnums=0)

Mesh axes of size 1 shard nothing, so the default table `fsdp_tp` is correct on any mesh shape. Everything here
works unchanged across several hosts (`jax.distributed.initialize()` first): `jax.devices()` is then global and
`host_local_to_global` assembles each host's slice of the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from stepjax import checks

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-like axis

LogicalRules = tuple[tuple[str, Any], ...]

_ACTIVATIONS: LogicalRules = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_head_dim", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)
_TENSOR: LogicalRules = (
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_kv_heads", "tensor"),
)
_NO_TENSOR: LogicalRules = tuple((name, None) for name, _ in _TENSOR)

RULES: dict[str, LogicalRules] = {
    # Parameters replicated; only the batch is split.
    "dp": _ACTIVATIONS + (("embed", None),) + _NO_TENSOR,
    # Parameters split along `embed` over the fsdp axis (gathered per layer by XLA), batch over data x fsdp.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"),) + _NO_TENSOR,
    # Megatron-style: heads, mlp and vocab over the tensor axis.
    "tp": _ACTIVATIONS + (("embed", None),) + _TENSOR,
    # Both; the default, since axes of size 1 are no-ops.
    "fsdp_tp": _ACTIVATIONS + (("embed", "fsdp"),) + _TENSOR,
}


def get_rules(name: str) -> LogicalRules:
  checks.check_choice(name, "sharding.rules", tuple(RULES))
  return RULES[name]


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the one axis given as -1 so that the product is `num_devices`. Raises one clear line otherwise."""
  unknown = [name for name in axes if name not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh: unknown axis {unknown[0]!r}; allowed axes: {list(MESH_AXES)}")
  sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free}")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes} (product {fixed})")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh: axis sizes {sizes} multiply to {fixed}, but there are {num_devices} devices")
  return sizes


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all devices of all hosts by default); one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 1} if axes is None else axes, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  try:  # topology-aware device order on TPU/GPU slices
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except  (CPU and odd device counts: plain order is fine)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree of `nn.Partitioned` (e.g. `jax.eval_shape(model.init, ...)`)."""
  return nn.get_partition_spec(boxed_tree)


def shardings_from_logical(specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh` under `rules`."""
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_params_and_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules, *args):
  """`jax.eval_shape` of a boxed init + the rules -> (abstract unboxed params, their NamedShardings).

  Nothing is allocated; use the shardings as `out_shardings` of a jitted init so each device materialises
  only its own shard.
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = shardings_from_logical(logical_specs(boxed), mesh, rules)
  return nn.meta.unbox(boxed), shardings


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules, *args):
  """Runs a boxed init straight into its shardings (unboxed params out). Returns (params, shardings)."""
  _, shardings = abstract_params_and_shardings(init_fn, mesh, rules, *args)
  init = jit_with_rules(lambda *a: nn.meta.unbox(init_fn(*a)), mesh, rules, out_shardings=shardings)
  return init(*args), shardings


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules: LogicalRules):
  """Activates `mesh` and `rules` so `nn.with_logical_constraint` inside traced code takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def jit_with_rules(fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules, **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)` whose calls (hence its tracing) run with `mesh` and `rules` active.

  `jax.set_mesh` may not be entered inside a trace, so the context wraps the jitted call, not `fn`.
  """
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with rules_context(mesh, rules):
      return jitted(*args, **kwargs)

  call.jitted = jitted
  return call


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shardings(tree: Any, mesh: Mesh) -> Any:
  """A NamedSharding per leaf: batch-major arrays split over data x fsdp, scalars replicated."""
  return jax.tree_util.tree_map(lambda x: batch_sharding(mesh, np.ndim(x)) if np.ndim(x) else replicated(mesh), tree)


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """One clear line before compiling when the batch cannot be split evenly over the data axes."""
  ways = math.prod(mesh.shape[name] for name in BATCH_AXES)
  if batch_size % ways:
    raise ValueError(f"{field}: {batch_size} is not divisible by the mesh's data x fsdp size {ways} "
                     f"(mesh {dict(mesh.shape)})")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places a host batch (the same full arrays on every host) onto the mesh, split over the data axes."""
  leaves = jax.tree_util.tree_leaves(tree)
  if leaves and np.ndim(leaves[0]):
    check_batch_divisible(np.shape(leaves[0])[0], mesh)
  return jax.device_put(tree, batch_shardings(tree, mesh))


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
  """Each host passes its own slice of the batch; returns global arrays split over the data axes (multi-host)."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), tree)


def process_rows(batch_size: int, mesh: Mesh) -> tuple[int, int]:
  """The rows [start, stop) of a [batch_size, ...] batch split over data x fsdp (`batch_sharding`) that this
  process's devices hold: its share of a multi-host batch, the one it passes to `host_local_to_global` (with one
  process, every row). The share must be one block of rows; a mesh whose device order interleaves the processes
  along data x fsdp is one ValueError line."""
  indices = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
  spans = sorted({(s.start or 0, batch_size if s.stop is None else s.stop) for (s,) in indices})
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"mesh: process {jax.process_index()} holds the rows {spans} of a batch of {batch_size}, not one "
                     "block; order the mesh's devices by process along data x fsdp")
  return start, stop


def process_local(x: jax.Array) -> np.ndarray:
  """This process's rows (`process_rows`) of a batch-major array split over data x fsdp, as numpy: the inverse of
  `host_local_to_global` (the whole array when this process can address all of it, or when it is replicated)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  blocks = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}  # tensor-axis copies: one each
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def with_leading_axis(shardings: Any) -> Any:
  """The NamedShardings of a tree stacked along a new leading axis (e.g. one entry per seed), that axis replicated:
  every device holds its shard of every entry, and a `jax.vmap` over the axis keeps each entry's own layout."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), shardings)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places a tree that every process holds whole (host values, or arrays on one local device) into `shardings` (a
  matching tree or one sharding for every leaf), also across processes: each device receives its shard.

  Arrays already spread over the mesh are resharded in place. A process-local device array of a multi-process run
  goes through host memory first, since `jax.device_put` cannot send a committed local array to other hosts.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
  multi = jax.process_count() > 1

  def put(x, sharding):
    if multi and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map(put, tree, shardings)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs and prints (every process runs the same programs)."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-process run (a no-op with one process): after process 0 changes shared
  files that the others read next (a workdir started over)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)
