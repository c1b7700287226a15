"""Host-environment training throughput on search_qa: one RL iteration (the host rollout on a thread pool, then the
jitted update), split into its phases.

The GRPO config on `env.name=search_qa` over a generated HotpotQA-layout file (`stepjax.testing.
write_multihop_questions`: two-hop bridge questions, 2 supporting + 2 distractor paragraphs each, one BM25 index over
all paragraphs), a 2-layer 64-wide policy from a random start, 8 questions x 4 episodes per iteration, byte tokenizer,
passages cut to 60 characters, max_len 640. Reported per iteration (median of repeats after a warm-up):

  act       decoding the actions (the jitted sampler, one call per step for the whole batch)
  env       the environments' `step` calls on the pool's threads (BM25 search, answer scoring)
  observe   appending the observations to the cache (jitted)
  update    everything else of the iteration: reset, finishing the batch, the update's two programs

env steps/s counts agent steps over the seconds spent inside the envs; agent steps/s over the whole iteration.

    python -m benchmarks.host_train [--repeats 5] [--questions 200] [--markdown out.md]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.common import arg_parser, emit  # noqa: E402
from experiments import host_runner, runner  # noqa: E402
from experiments.configs import grpo  # noqa: E402
from stepjax import train  # noqa: E402
from stepjax.envs.host import HostEnvPool  # noqa: E402
from stepjax.testing import write_multihop_questions  # noqa: E402


def main(argv=None):
  parser = arg_parser(__doc__, repeats=5)
  parser.add_argument("--questions", type=int, default=200)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "questions.json")
    write_multihop_questions(data, count=args.questions)
    config = grpo.get_config()
    config.env.update(name="search_qa", data=data, passage_budget=60)
    config.rollout.update(num_tasks=8, episodes_per_task=4, max_len=640, max_obs_len=192, max_action_len=48)
    config.model.max_position_embeddings = 640
    setup = runner.build(config)
    mc, rc = setup.model_config, setup.rollout_config
    iteration = train.make_host_train_iteration(mc, rc, setup.tokenizer, setup.update_config, setup.optim_config)
    state = train.init_train_state(mc, setup.update_config, setup.optim_config, jax.random.key(0))
    rows = []
    with HostEnvPool(setup.host.make_envs(setup.host.train_items, rc.batch_size)) as pool:
      for repeat in range(args.repeats + 1):  # the first is the warm-up (compilation)
        tasks, groups = host_runner.host_rows(state, setup)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        state, metrics = iteration(state, pool, tasks, groups, timings)
        total = time.perf_counter() - start
        if repeat:
          rows.append({"total": total, **timings, "agent_steps": metrics["agent_steps"]})
  median = {key: statistics.median(row.get(key, 0.0) for row in rows) for key in ("total", "act", "env", "observe",
                                                                                   "agent_steps")}
  median["update"] = median["total"] - median["act"] - median["env"] - median["observe"]
  lines = [
      f"search_qa host training, GRPO, {rc.num_tasks} x {rc.episodes_per_task} episodes, {mc.num_layers} x "
      f"{mc.hidden_size} policy, {len(setup.host.train_items)} training questions, median of {args.repeats} "
      f"iterations after a warm-up, {jax.devices()[0].platform}",
      "",
      "| phase | s / iteration | share |",
      "|---|---:|---:|",
      *(f"| {name} | {median[name]:.3f} | {median[name] / median['total']:.0%} |"
        for name in ("act", "env", "observe", "update")),
      f"| iteration | {median['total']:.3f} | |",
      "",
      f"agent steps per iteration {median['agent_steps']:.0f}; agent steps/s "
      f"{median['agent_steps'] / median['total']:.1f}; env steps/s "
      f"{median['agent_steps'] / max(median['env'], 1e-9):.0f}",
  ]
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
