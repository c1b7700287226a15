"""RL iterations per second: the fused PureJaxRL-style loop against a per-iteration host loop, and seeds in one program.

All rows run the demo's StepPO setting (experiments/configs/steppo.py in `make demo`'s one-hop regime: lookup_qa,
one hop, 16 entities, the word tokenizer, a 2-layer 64-wide policy with a separate critic, 8 tasks x 4 episodes per
iteration, 2 epochs x 2 minibatches; `--regime none` runs the lookup_qa preset's 2-hop think-format steps instead)
from the same random start:

  host loop     per iteration: the jitted rollout, then `make_update` (two jitted programs), called from Python;
  fused         `lax.scan` of `make_train_iteration` over K iterations in one jit (what experiments/ runs);
  fused, vmap   the same with S seeds in one program (`jax.vmap`), reported per seed-iteration.

Both single-seed loops compute the same thing (tests/test_make_train.py checks the fused iteration against rollout +
make_update). Median of repeated K-iteration chunks after a warm-up chunk.

    python -m benchmarks.train [--repeats 3] [--iterations 5] [--seeds 3] [--regime one_hop|none] [--markdown out.md]
"""

from __future__ import annotations

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit, median_seconds  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.configs import presets, steppo  # noqa: E402
from stepjax import rollout, train  # noqa: E402
from stepjax.models import Transformer  # noqa: E402


def main(argv=None):
  parser = arg_parser(__doc__, repeats=3)
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--regime", default="one_hop", choices=["none", *presets.REGIMES])
  args = parser.parse_args(argv)
  config = presets.with_regime(steppo.get_config(), args.regime)
  setup = runner.build(config)
  mc, uc, oc, rc = setup.model_config, setup.update_config, setup.optim_config, setup.rollout_config
  k = args.iterations
  iteration = train.make_train_iteration(mc, setup.env, rc, uc, oc)
  chunk = jax.jit(lambda s, p: jax.lax.scan(lambda s, _: iteration(s, p), s, None, length=k), donate_argnums=0)
  sample = jax.jit(rollout.make_rollout(Transformer(mc), setup.env, rc))
  update = train.make_update(mc, uc, oc)

  def host_loop(state):
    for _ in range(k):
      rng, rollout_key = jax.random.split(state.key)
      trunk = {n: v for n, v in state.params["policy"].items() if n != "value_head"}
      batch, _ = sample(trunk, setup.env_params, rollout_key)
      state, _ = update(state.replace(rng=jax.random.key_data(rng)), batch)
    return state

  init = lambda key: train.init_train_state(mc, uc, oc, key)  # noqa: E731
  states = {"fused": init(jax.random.key(1)), "host": init(jax.random.key(1))}

  def run_fused():
    states["fused"], metrics = chunk(states["fused"], setup.env_params)
    jax.block_until_ready(metrics)

  def run_host():
    states["host"] = host_loop(states["host"])
    jax.block_until_ready(states["host"].params)

  keys = jax.random.split(jax.random.key(2), args.seeds)
  vchunk = jax.jit(jax.vmap(lambda s, p: jax.lax.scan(lambda s, _: iteration(s, p), s, None, length=k),
                            in_axes=(0, None)), donate_argnums=0)
  states["vmap"] = jax.jit(jax.vmap(init))(keys)

  def run_vmap():
    states["vmap"], metrics = vchunk(states["vmap"], setup.env_params)
    jax.block_until_ready(metrics)

  host_s, _ = median_seconds(run_host, args.repeats)
  fused_s, _ = median_seconds(run_fused, args.repeats)
  vmap_s, _ = median_seconds(run_vmap, args.repeats)
  per_host, per_fused, per_vmap = host_s / k, fused_s / k, vmap_s / (k * args.seeds)
  lines = [
      f"RL iteration, StepPO demo setting ({rc.batch_size} episodes, {uc.epochs} epochs x {uc.minibatches} "
      f"minibatches), median of {args.repeats} chunks of {k} iterations, {jax.devices()[0].platform}",
      "",
      "| loop | s / iteration (per seed) | vs host loop |",
      "|---|---:|---:|",
      f"| host loop (jitted rollout + make_update per iteration) | {per_host:.3f} | 1.00x |",
      f"| fused (`lax.scan` of make_train_iteration, one jit) | {per_fused:.3f} | {per_host / per_fused:.2f}x |",
      f"| fused, {args.seeds} seeds vmapped (per seed-iteration) | {per_vmap:.3f} | {per_host / per_vmap:.2f}x |",
  ]
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
