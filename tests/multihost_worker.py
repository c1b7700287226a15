"""One process of a 2-process CPU "multi-host" run (launched by test_multihost.py).

Each process owns 4 fake CPU devices; jax.distributed joins them into 8 global devices over gloo on 127.0.0.1.
The same sharding code as a single host builds a (data=4, fsdp=2) mesh, each process feeds only its half of the
batch, and a sharded value_and_grad must equal the single-process numbers printed by process 0; each process's share
of a batch (`sharding.process_rows`) is its half, and `process_local` reads back what it fed.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from stepjax import sharding  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())
mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
rng = np.random.default_rng(0)
x_full = rng.normal(size=(16, 8)).astype(np.float32)
w = rng.normal(size=(8, 4)).astype(np.float32)
x_local = x_full[process_id * 8:(process_id + 1) * 8]  # this host's slice of the batch


def loss(w, x):
  return jnp.mean(jnp.tanh(x @ w) ** 2)


x = sharding.host_local_to_global(x_local, mesh)
step = sharding.jit_with_rules(jax.value_and_grad(loss), mesh, sharding.get_rules("fsdp"),
                               in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                               out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
value, grad = step(jax.device_put(w, sharding.replicated(mesh)), x)
value, grad = multihost_utils.process_allgather((value, grad), tiled=True)
ref_value, ref_grad = jax.value_and_grad(loss)(w, x_full)
np.testing.assert_allclose(value, ref_value, rtol=1e-5)
np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
# Each process's share of a batch (the rows its devices hold) and its round trip, on this mesh and on one with a
# tensor axis (whose copies of a row live on both tensor devices): what the host-environment loop feeds and reads.
for shape in ({"data": -1, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
  m = sharding.make_mesh(shape)
  assert sharding.process_rows(16, m) == (process_id * 8, process_id * 8 + 8), sharding.process_rows(16, m)
  local = {"ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)[process_id * 8:process_id * 8 + 8],
           "flags": np.arange(16)[process_id * 8:process_id * 8 + 8] % 3 == 0}
  back = jax.tree.map(sharding.process_local, sharding.host_local_to_global(local, m))
  jax.tree.map(np.testing.assert_array_equal, back, local)
print(json.dumps({"process": process_id, "loss": float(value), "devices": jax.device_count()}), flush=True)
jax.distributed.shutdown()
