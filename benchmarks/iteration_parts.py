"""Where one RL iteration spends its time: the rollout, the update's two programs, and the forward they repeat.

The StepPO config in a chosen regime (default: the lookup_qa preset's 2-hop think-format steps, max_len 256;
`--regime one_hop` for make demo's), one seed, 32 episodes, from a random start:

  rollout    the jitted episode loop (decode, env steps, cache extension)
  prepare    critic values over the batch, then credit assignment (the update's first program)
  optimize   epochs x minibatches of forward + backward + AdamW (the update's second program), not donated
  forward    the policy's packed forward over the batch at the rollout's max_len, and at half of it: the ratio
             shows how much of the work is the quadratic attention

Median of repeated runs after a warm-up.

    python -m benchmarks.iteration_parts [--repeats 3] [--regime none|one_hop] [--markdown out.md]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit, median_seconds  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.configs import presets, steppo  # noqa: E402
from stepjax import rollout, train  # noqa: E402
from stepjax.models import Transformer  # noqa: E402
from stepjax.train import update as update_lib  # noqa: E402
from stepjax.train.state import StateSpec, policy_trunk  # noqa: E402


def main(argv=None):
  parser = arg_parser(__doc__, repeats=3)
  parser.add_argument("--regime", default="none", choices=["none", *presets.REGIMES])
  args = parser.parse_args(argv)
  config = presets.with_regime(steppo.get_config(), args.regime)
  setup = runner.build(config)
  mc, uc, oc, rc = setup.model_config, setup.update_config, setup.optim_config, setup.rollout_config
  model = Transformer(mc)
  state = train.init_train_state(mc, uc, oc, jax.random.key(1))
  trunk = policy_trunk(state.params["policy"])
  sample = jax.jit(rollout.make_rollout(model, setup.env, rc))
  batch, _ = sample(trunk, setup.env_params, jax.random.key(0))
  spec = StateSpec.for_update(mc, uc, oc)
  prepare = update_lib._prepare_program(spec, uc.credit, uc.minibatches)  # pylint: disable=protected-access
  data, _ = prepare(state.params, state.ref_params, batch)
  optimize = jax.jit(lambda s, d: update_lib._optimize(spec, uc.loss_side(), s, d))  # pylint: disable=protected-access
  forward = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens)[0])
  half = batch.tokens[:, :rc.max_len // 2]

  times = {
      "rollout": median_seconds(lambda: jax.block_until_ready(sample(trunk, setup.env_params, jax.random.key(2))),
                                args.repeats)[0],
      "prepare": median_seconds(lambda: jax.block_until_ready(prepare(state.params, state.ref_params, batch)),
                                args.repeats)[0],
      "optimize": median_seconds(lambda: jax.block_until_ready(optimize(state, data)), args.repeats)[0],
      "forward": median_seconds(lambda: jax.block_until_ready(forward(trunk, batch.tokens)), args.repeats)[0],
      "forward_half": median_seconds(lambda: jax.block_until_ready(forward(trunk, half)), args.repeats)[0],
  }
  total = times["rollout"] + times["prepare"] + times["optimize"]
  b, length = batch.tokens.shape
  lines = [
      f"One StepPO iteration, regime {args.regime!r} ({b} episodes, max_len {length}, mean episode "
      f"{float(jnp.mean(batch.seq_len)):.0f} tokens, {uc.epochs} epochs x {uc.minibatches} minibatches), median of "
      f"{args.repeats}, {jax.devices()[0].platform}",
      "",
      "| part | s | share of the iteration |",
      "|---|---:|---:|",
      *(f"| {name} | {times[name]:.3f} | {times[name] / total:.0%} |" for name in ("rollout", "prepare", "optimize")),
      f"| policy forward, L = {length} | {times['forward']:.3f} | |",
      f"| policy forward, L = {length // 2} | {times['forward_half']:.3f} | "
      f"(x{times['forward'] / times['forward_half']:.1f} for 2x the length) |",
  ]
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
