"""Agent steps per second: the fully jitted rollout vs the host loop, on the same JAX environment and policy.

Both loops run `lookup_qa` (the default environment) with the same tiny policy: batch 64, 8 steps, CPU, greedy
decoding, 16-token step budget. The jitted loop is one `lax.scan` over steps inside one `jit`; the host loop calls
the same jitted `act` / `observe` pieces per step and steps the environments through `HostEnvPool` +
`JaxEnvAsHost` (one jitted single-episode step per environment, on a thread pool), the way a Python environment
is driven. Both produce the same EpisodeBatch (checked).

Where the time goes: for the host loop, wall seconds per phase (act = decode + writes; env; observe = cache
extension + writes). For the jitted loop, the same decode work alone (a jitted scan of decode + extend with fixed
observations) and the environment alone (a jitted scan of vmapped env steps on the same actions); the rest is
bookkeeping.

    python -m benchmarks.rollout [--repeats 5] [--markdown out.md]
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import arg_parser, emit, median_seconds
from stepjax import rollout, sampling
from stepjax.envs.host import HostEnvPool, JaxEnvAsHost
from stepjax.envs.lookup_qa import LookupQA
from stepjax.models import transformer
from stepjax.tokenizers import ByteTokenizer



def main(argv=None):
  parser = arg_parser(__doc__, repeats=5)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args(argv)
  tok = ByteTokenizer()
  env = LookupQA(tok)
  params_env = env.default_params()
  model_config = transformer.get_config("tiny", dtype="float32", vocab_size=tok.vocab_size)
  model = transformer.Transformer(model_config)
  params = transformer.init_params(model_config, jax.random.key(0))
  config = rollout.RolloutConfig(num_tasks=args.batch, max_steps=args.steps, max_action_len=16,
                                 max_obs_len=env.max_obs_len,
                                 max_len=env.max_obs_len + args.steps * (16 + env.max_obs_len) + 16, greedy=True,
                                 stop_ids=(tok.end_of_step_id, tok.eos_id), pad_id=tok.pad_id)
  key = jax.random.key(1)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; batch {args.batch}, "
        f"{args.steps} steps, context {config.max_len}", flush=True)

  jitted = jax.jit(rollout.make_rollout(model, env, config))
  batch, _ = jitted(params, params_env, key)
  steps = int(np.asarray(batch.step_mask).sum())
  t_jit, _ = median_seconds(lambda: jax.block_until_ready(jitted(params, params_env, key)), args.repeats)

  reset_keys, groups = rollout.task_keys_and_groups(jax.random.split(key)[0], config)
  envs = [JaxEnvAsHost(env, params_env, seed_to_key=lambda row: reset_keys[row]) for _ in range(config.batch_size)]
  host_run = rollout.make_host_rollout(model, config, tok)
  seeds = list(range(config.batch_size))
  with HostEnvPool(envs) as pool:
    hosted, _ = host_run(params, pool, seeds, key, group_ids=groups)
    np.testing.assert_array_equal(np.asarray(hosted.tokens), np.asarray(batch.tokens))
    timings = {}
    t_host, runs = median_seconds(lambda: host_run(params, pool, seeds, key, group_ids=groups, timings=timings),
                           args.repeats)
  phases = {k: v / (len(runs) + 1) for k, v in timings.items()}  # per run (warm-up included in the sum)

  # The jitted loop's parts, on the same shapes: decode + extension alone, and the environment alone.
  obs = jnp.asarray(np.asarray(batch.tokens[:, :env.max_obs_len]))
  obs_len = jnp.full((config.batch_size,), 50, jnp.int32)

  @jax.jit
  def decode_only(params):
    rs = rollout.begin(model, params, obs, obs_len, groups, config)

    def body(carry, k):
      cache, logits = carry
      out = sampling.decode(model, params, cache, logits, k, config.sampling_config())
      return sampling.extend(model, params, obs, obs_len, out.cache, out.next_logits), out.lengths

    return jax.lax.scan(body, (rs.cache, rs.next_logits), jax.random.split(key, args.steps))

  actions = jnp.asarray(np.asarray(batch.tokens[:, :env.max_action_len]))
  action_len = jnp.full((config.batch_size,), 16, jnp.int32)

  @jax.jit
  def env_only(keys):
    state, _, _ = jax.vmap(env.reset, in_axes=(0, None))(keys, params_env)

    def body(state, k):
      out = jax.vmap(env.step, in_axes=(0, 0, 0, 0, None))(jax.random.split(k, config.batch_size), state, actions,
                                                          action_len, params_env)
      return out[0], out[3]

    return jax.lax.scan(body, state, jax.random.split(key, args.steps))

  t_decode, _ = median_seconds(lambda: jax.block_until_ready(decode_only(params)), args.repeats)
  t_env, _ = median_seconds(lambda: jax.block_until_ready(env_only(reset_keys)), args.repeats)

  lines = [
      f"| loop (lookup_qa, B={args.batch}, {args.steps} steps, tiny policy, CPU) | median s | agent steps/s | ratio |",
      "|---|---|---|---|",
      f"| host loop (HostEnvPool + JaxEnvAsHost, jitted act/observe) | {t_host:.3f} | {steps / t_host:.0f} | 1.0x |",
      f"| fully jitted rollout (one `lax.scan` in one `jit`) | {t_jit:.3f} | {steps / t_jit:.0f} | "
      f"**{t_host / t_jit:.1f}x** |",
      "",
      "| where the time goes | host loop s | jitted loop s |",
      "|---|---|---|",
      f"| decoding (+ cache extension) | {phases.get('act', 0):.3f} + {phases.get('observe', 0):.3f} | "
      f"{t_decode:.3f} (decode + extend alone) |",
      f"| environment | {phases.get('env', 0):.3f} (thread pool, per-env jitted step, text decode) | "
      f"{t_env:.4f} (vmapped step alone) |",
      f"| bookkeeping / other | {t_host - sum(phases.values()):.3f} | {max(t_jit - t_decode - t_env, 0):.3f} |",
      "",
      f"{steps} agent steps per rollout; both loops produce the same EpisodeBatch (checked token for token).",
  ]
  emit(lines, args.markdown)


if __name__ == "__main__":
  main()
