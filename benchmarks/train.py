"""RL iterations per second: the fused PureJaxRL-style loop against a per-iteration host loop, and seeds in one program.

All rows run the demo's StepPO setting (experiments/configs/steppo.py in `make demo`'s one-hop regime: lookup_qa,
one hop, 16 entities, the word tokenizer, a 2-layer 64-wide policy with a separate critic, 8 tasks x 4 episodes per
iteration, 2 epochs x 2 minibatches; `--regime none` runs the lookup_qa preset's 2-hop think-format steps instead)
from the same random start:

  host loop     per iteration: the jitted rollout, then `make_update` (two jitted programs), called from Python;
  fused         `lax.scan` of `make_train_iteration` over K iterations in one jit (what experiments/ runs);
  fused, vmap   the same with S seeds in one program (`jax.vmap`), reported per seed-iteration.

Both single-seed loops compute the same thing (tests/test_make_train.py checks the fused iteration against rollout +
make_update). After a warm-up chunk of each, the three are timed in interleaved rounds (one K-iteration chunk of
each per round, the order rotated), and each is compared with the host loop round by round: a single reading of one
loop after the other moved by 25% between two runs of this script on an idle machine. --busy_cores N keeps N other
cores spinning while timing (the machine shared with other jobs).

    python -m benchmarks.train [--repeats 3] [--iterations 5] [--seeds 3] [--regime one_hop|none] [--busy_cores N]
                               [--markdown out.md]
"""

from __future__ import annotations

import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BusyCores, arg_parser, emit, interleaved_seconds  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.configs import presets, steppo  # noqa: E402
from stepjax import rollout, train  # noqa: E402
from stepjax.models import Transformer  # noqa: E402


def main(argv=None):
  parser = arg_parser(__doc__, repeats=3)
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--regime", default="one_hop", choices=["none", *presets.REGIMES])
  parser.add_argument("--busy_cores", type=int, default=0, help="keep this many other cores busy while timing")
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

  load = os.getloadavg()[0]  # other jobs' load, before the busy cores start
  with BusyCores(args.busy_cores):
    times = interleaved_seconds({"host": run_host, "fused": run_fused, "vmap": run_vmap}, args.repeats)
  per = {"host": k, "fused": k, "vmap": k * args.seeds}  # iterations (seed-iterations) per timed chunk
  median = {name: statistics.median(ts) / per[name] for name, ts in times.items()}

  def versus_host(name):
    """'median (min-max)' of the rounds' paired speed-ups over the host loop."""
    ratios = [(h / per["host"]) / (t / per[name]) for h, t in zip(times["host"], times[name])]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

  busy = f", {args.busy_cores} other cores kept busy" if args.busy_cores else ""
  lines = [
      f"RL iteration, StepPO demo setting ({rc.batch_size} episodes, {uc.epochs} epochs x {uc.minibatches} "
      f"minibatches), {args.repeats} interleaved rounds of {k}-iteration chunks, {jax.devices()[0].platform}, "
      f"{os.cpu_count()} cores{busy}, load {load:.1f} at the start",
      "",
      "| loop | s / iteration (per seed), median | vs host loop: median of the paired rounds (min-max) |",
      "|---|---:|---:|",
      f"| host loop (jitted rollout + make_update per iteration) | {median['host']:.3f} | 1.00x |",
      f"| fused (`lax.scan` of make_train_iteration, one jit) | {median['fused']:.3f} | {versus_host('fused')} |",
      f"| fused, {args.seeds} seeds vmapped (per seed-iteration) | {median['vmap']:.3f} | {versus_host('vmap')} |",
  ]
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
