"""A per-device memory plan for real model sizes, from abstract shapes only (nothing is materialised).

For each (model, device count, rule table) the RL train state (policy + separate critic + frozen reference policy +
AdamW moments) is built with `jax.eval_shape` and the project's shardings (`train.state.state_shardings`), and its
per-device bytes are summed from the shard shapes. The two programs of one update (`prepare`: critic values and
reference log-probs; `optimize`: forward + backward + AdamW over one minibatch) and one decode step with its KV
cache are compiled ahead of time (`jit(...).lower(...).compile()`) on fake CPU devices, and
`compiled.memory_analysis()` gives argument, output, alias and temp bytes; peak = argument + output - alias + temp.
Beside each figure stands an analytic estimate from the config alone (parameters x bytes / shards, Adam 2x the
parameters, an activation model with and without remat); a ratio outside [0.8, 1.25] is flagged with its likely
cause.

Meshes for n devices: dp = data n; fsdp = fsdp n; tp = tensor t x data n/t; fsdp_tp = tensor t x fsdp n/t, where t is
the largest power of two <= n dividing heads, kv heads, intermediate and vocab (8 kv heads allow t <= 8). `--batch`
is rows per data shard, so the global batch is batch x data x fsdp and per-device activations do not depend on n.

These are XLA *CPU* figures: see BENCHMARKS.md ("Memory plan") for what they do and do not say about GPU/TPU HBM.

    python -m benchmarks.memory [--models qwen2.5-0.5b,qwen2.5-1.5b] [--devices 8] [--rules dp,fsdp,tp,fsdp_tp]
        [--batch 8] [--context 2048] [--remat full] [--no-scan] [--shapes-only qwen2.5-7b,qwen3-8b] [--markdown out.md]
"""

from __future__ import annotations

import math
import os
import sys
import time


def _force_devices(argv) -> None:
  """Fake CPU devices for the largest mesh asked for; must run before jax is imported."""
  count = 8
  for i, arg in enumerate(argv):
    value = argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else arg[len("--devices="):] \
        if arg.startswith("--devices=") else None
    if value:
      count = max(int(v) for v in value.split(","))
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
  _force_devices(sys.argv[1:])

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit  # noqa: E402
from stepjax import sharding as sharding_lib  # noqa: E402
from stepjax.models import transformer  # noqa: E402
from stepjax.models.value import ValueConfig  # noqa: E402
from stepjax.train import update as update_lib  # noqa: E402
from stepjax.train.config import OptimConfig, UpdateConfig  # noqa: E402
from stepjax.train.optim import CRITIC  # noqa: E402
from stepjax.train.state import StateSpec, abstract_state, state_shardings  # noqa: E402
from stepjax.types import EpisodeBatch  # noqa: E402

GIB = 2 ** 30
CAPACITIES_GB = (16, 40, 80, 141)
HEADROOM = 0.9  # a plan "fits" when its peak is at most this fraction of the device memory
FLAG_LOW, FLAG_HIGH = 0.8, 1.25  # measured / analytic outside this band is flagged (20%)
ADAM_COUNTERS_BYTES = 16  # two AdamW transforms (actor, critic), each an int32 Adam count and a schedule count

# Shapes not among the library presets, from the public Hugging Face config.json.
EXTRA_SHAPES = {
    "qwen2.5-1.5b": transformer.ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                            num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                                            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                            qkv_bias=True, max_position_embeddings=32768, dtype="bfloat16"),
}


def model_config(name: str, remat: bool, scan: bool, param_dtype: str) -> transformer.ModelConfig:
  """A preset (or EXTRA_SHAPES entry) with the plan's remat / scan / parameter dtype."""
  overrides = dict(remat=remat, scan_layers=scan, param_dtype=param_dtype)
  if name in EXTRA_SHAPES:
    return EXTRA_SHAPES[name].replace(**overrides).validate()
  return transformer.get_config(name, **overrides)


def tensor_ways(config: transformer.ModelConfig, devices: int) -> int:
  """The largest power of two <= devices that divides every tensor-split dimension."""
  dims = (config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size)
  ways = 1
  while ways * 2 <= devices and all(d % (ways * 2) == 0 for d in dims):
    ways *= 2
  return ways


def mesh_axes(config: transformer.ModelConfig, rule: str, devices: int) -> dict[str, int]:
  t = tensor_ways(config, devices)
  return {"dp": {"data": devices}, "fsdp": {"fsdp": devices}, "tp": {"data": devices // t, "tensor": t},
          "fsdp_tp": {"fsdp": devices // t, "tensor": t}}[rule]


# --------------------------------------------------------------------------------------------------
# Abstract state and its per-device bytes
# --------------------------------------------------------------------------------------------------


def update_configs() -> tuple[UpdateConfig, OptimConfig]:
  """The RL update the plan sizes: step GAE with a separate critic and a KL term (so a reference is kept)."""
  return UpdateConfig(value=ValueConfig(kind="separate"), kl_coef=0.01), OptimConfig()


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds: the sum over leaves of the shard shape's size x itemsize (the largest shard)."""
  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings)
  assert len(leaves) == len(shards), (len(leaves), len(shards))
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


def state_bytes(spec: StateSpec) -> dict[str, int]:
  """Per-device bytes of the policy, its AdamW state, the reference policy and the critic (from the shardings)."""
  state, shardings = abstract_state(spec), state_shardings(spec)
  return {"policy": shard_bytes(state.params["policy"], shardings.params["policy"]),
          "critic": shard_bytes(state.params.get(CRITIC, {}), shardings.params.get(CRITIC, {})),
          "optimizer": shard_bytes(state.opt_state, shardings.opt_state),
          "reference": shard_bytes(state.ref_params, shardings.ref_params),
          "total": shard_bytes(state, shardings)}


# --------------------------------------------------------------------------------------------------
# Analytic estimate (from the config and the rule table alone)
# --------------------------------------------------------------------------------------------------


def param_table(config: transformer.ModelConfig, critic: bool = False) -> list[tuple[tuple[int, ...], tuple]]:
  """(shape, logical axes) of every parameter of the Transformer (or of the Critic: no lm_head, + value head),
  written out from the config (see the table in `models/transformer.py`), not traced from the module."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  h, k, dh = config.num_heads, config.num_kv_heads, config.head_dim
  layer = [((d,), ("norm",)), ((d, h, dh), ("embed", "heads", "head_dim")),
           ((d, k, dh), ("embed", "kv_heads", "head_dim")), ((d, k, dh), ("embed", "kv_heads", "head_dim")),
           ((h, dh, d), ("heads", "head_dim", "embed")), ((d,), ("norm",)), ((d, f), ("embed", "mlp")),
           ((d, f), ("embed", "mlp")), ((f, d), ("mlp", "embed"))]
  if config.qkv_bias:
    layer += [((h, dh), ("heads", "head_dim")), ((k, dh), ("kv_heads", "head_dim")), ((k, dh), ("kv_heads", "head_dim"))]
  if config.qk_norm:
    layer += [((dh,), ("norm",)), ((dh,), ("norm",))]
  table = [((v, d), ("vocab", "embed")), ((d,), ("norm",))] + layer * config.num_layers
  if critic:
    table += [((d,), ("embed",)), ((), ())]
  elif not config.tie_word_embeddings:
    table.append(((d, v), ("embed", "vocab")))
  return table


def axis_ways(logical: str, rules, mesh_shape: dict[str, int]) -> int:
  """How many ways the rule table splits one logical axis on a mesh."""
  target = dict(rules).get(logical)
  names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return math.prod(mesh_shape.get(name, 1) for name in names)


def analytic_param_bytes(config: transformer.ModelConfig, rules, mesh_shape: dict[str, int],
                         critic: bool = False) -> int:
  """Per device: sum over parameters of size x bytes / the ways its axes are split."""
  itemsize = jnp.dtype(config.param_dtype).itemsize
  total = 0
  for shape, axes in param_table(config, critic):
    total += math.prod(n // axis_ways(a, rules, mesh_shape) for n, a in zip(shape, axes)) * itemsize
  return total


def param_count(config: transformer.ModelConfig) -> int:
  return sum(math.prod(shape) for shape, _ in param_table(config))


def analytic_state(config, rules, mesh_shape) -> dict[str, int]:
  """Policy, critic, reference: parameter bytes / shards; AdamW: two float32 moments per parameter (the optimizer
  computes in float32 whatever the parameter dtype, OptimConfig.state_dtype) + counters."""
  policy = analytic_param_bytes(config, rules, mesh_shape)
  critic = analytic_param_bytes(config, rules, mesh_shape, critic=True)
  moments_per_param_byte = 2 * 4 // jnp.dtype(config.param_dtype).itemsize
  optimizer = moments_per_param_byte * (policy + critic) + ADAM_COUNTERS_BYTES
  return {"policy": policy, "critic": critic, "optimizer": optimizer, "reference": policy,
          "total": 2 * policy + critic + optimizer + 16}  # + step, skipped_updates, rng


def analytic_activations(config, rules, mesh_shape, rows: int, length: int, remat: bool) -> dict[str, int]:
  """Saved activations of one forward (per device) that the backward needs, for the trunk and for the logits.

  Per layer and token (compute dtype c, tensor split t): residual and two norms (4 D c + 2 D x 4 for the float32
  norm inputs), q/k/v before and after RoPE (2 (H + 2K) Dh c / t), the attention output (H Dh c / t), the MLP (3 F
  c / t), and with the plain attention (attention_block 0) float32 scores and probabilities, 2 x 4 x H/t x T per
  token. With remat only each layer's input (D c) is kept, plus one layer's working set live in the backward.
  Logits: float32 [rows, T, V/t], about 4 live copies (logits, log-softmax, softmax for the entropy, their gradient).
  """
  c = jnp.dtype(config.dtype).itemsize
  t = axis_ways("heads", rules, mesh_shape)
  d, f, h, k, dh = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                    config.head_dim)
  tokens = rows * length
  attention = 0 if config.attention_block else 8 * (h // t) * length
  per_token = 4 * d * c + 8 * d + (2 * (h + 2 * k) * dh + h * dh + 3 * f) * c // t + attention
  layer = tokens * per_token
  trunk = tokens * d * c * config.num_layers + layer if remat else layer * config.num_layers
  logits = 4 * tokens * (config.vocab_size // axis_ways("vocab", rules, mesh_shape)) * 4
  return {"trunk": trunk, "logits": logits}


def analytic_update_peak(config, rules, mesh_shape, rows: int, length: int, remat: bool) -> int:
  """The optimize program: state + batch + gradients and the AdamW update (each the size of the trained
  parameters) + the activations of the policy (trunk and logits) and of the critic (trunk) saved for the backward."""
  state = analytic_state(config, rules, mesh_shape)
  trained = state["policy"] + state["critic"]
  acts = analytic_activations(config, rules, mesh_shape, rows, length, remat)
  batch = rows * length * 13 + rows * 64  # int32 tokens / ids, float32 log-probs, bools, per-step fields
  return state["total"] + batch + 2 * trained + 2 * acts["trunk"] + acts["logits"]


def analytic_decode(config, rules, mesh_shape, rows: int, cache_len: int) -> dict[str, int]:
  """One decode step: policy parameters + KV cache k and v [N, rows, M, K/t, Dh] + float32 logits [rows, V/t]."""
  c = jnp.dtype(config.dtype).itemsize
  kv = 2 * config.num_layers * rows * cache_len * (config.num_kv_heads // axis_ways("kv_heads", rules, mesh_shape)) \
      * config.head_dim * c
  params = analytic_param_bytes(config, rules, mesh_shape)
  logits = rows * (config.vocab_size // axis_ways("vocab", rules, mesh_shape)) * 4
  return {"cache": kv, "peak": params + kv + 2 * logits}


# --------------------------------------------------------------------------------------------------
# AOT compiles
# --------------------------------------------------------------------------------------------------


def abstract_batch(rows: int, length: int, steps: int) -> EpisodeBatch:
  tok = lambda dtype: jax.ShapeDtypeStruct((rows, length), dtype)
  step = lambda dtype: jax.ShapeDtypeStruct((rows, steps), dtype)
  row = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype)
  return EpisodeBatch(tokens=tok(jnp.int32), action_mask=tok(jnp.bool_), step_ids=tok(jnp.int32),
                      logprobs=tok(jnp.float32), step_start=step(jnp.int32), step_len=step(jnp.int32),
                      step_rewards=step(jnp.float32), step_mask=step(jnp.bool_), seq_len=row(jnp.int32),
                      terminated=row(jnp.bool_), truncated=row(jnp.bool_), group_id=row(jnp.int32),
                      bootstrap_pos=row(jnp.int32))


def memory_of(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
         "temp": m.temp_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compile_update(spec: StateSpec, update_config: UpdateConfig, rows: int, length: int, steps: int) -> dict:
  """AOT-compiles the two programs `make_update` runs (the same cached builders) at `rows` global rows."""
  state = abstract_state(spec)
  batch = abstract_batch(rows, length, steps)
  prepare = update_lib._prepare_program(spec, update_config.credit, update_config.minibatches)  # pylint: disable=protected-access
  optimize = update_lib._optimize_program(spec, update_config.loss_side())  # pylint: disable=protected-access
  with sharding_lib.rules_context(spec.mesh, spec.rules):
    start = time.perf_counter()
    prepared = prepare.jitted.lower(state.params, state.ref_params, batch).compile()
    data, _ = jax.eval_shape(prepare.jitted, state.params, state.ref_params, batch)
    optimized = optimize.jitted.lower(state, data).compile()
    seconds = time.perf_counter() - start
  return {"prepare": memory_of(prepared), "optimize": memory_of(optimized), "seconds": seconds}


def compile_decode(spec: StateSpec, rows: int, cache_len: int) -> dict:
  """AOT-compiles one decode step (one token per row into a donated KV cache) with the policy's params."""
  config, mesh, rules = spec.model, spec.mesh, spec.rules
  params, param_shardings = sharding_lib.abstract_params_and_shardings(
      lambda: transformer.Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
      mesh, rules)
  cache = jax.eval_shape(lambda: transformer.init_cache(config, rows, cache_len))
  cache_shardings = sharding_lib.shardings_from_logical(transformer.cache_logical_axes(), mesh, rules)
  tokens = jax.ShapeDtypeStruct((rows,), jnp.int32)

  def step(params, cache, tokens):
    logits, _, cache = transformer.forward(config, params, tokens[:, None], cache=cache)
    return logits[:, -1], cache

  jitted = jax.jit(step, in_shardings=(param_shardings, cache_shardings, sharding_lib.batch_sharding(mesh, 1)),
                   out_shardings=(sharding_lib.batch_sharding(mesh, 2), cache_shardings), donate_argnums=1)
  with sharding_lib.rules_context(mesh, rules):
    start = time.perf_counter()
    compiled = jitted.lower(params, cache, tokens).compile()
    seconds = time.perf_counter() - start
  return {**memory_of(compiled), "cache": shard_bytes(cache, cache_shardings), "seconds": seconds}


# --------------------------------------------------------------------------------------------------
# One plan row and the tables
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  model: str
  devices: int
  rule: str
  mesh: dict
  config: transformer.ModelConfig
  rows: int  # global rows of the update
  decode_rows: int
  state: dict
  analytic: dict
  update: dict | None = None
  decode: dict | None = None
  analytic_update: int = 0
  analytic_update_other_remat: int = 0
  analytic_decode: dict | None = None


def plan(name: str, devices: int, rule: str, args, compile_programs: bool) -> Plan:
  config = model_config(name, args.remat == "full", not args.no_scan, args.param_dtype)
  shape = mesh_axes(config, rule, devices)
  mesh = sharding_lib.make_mesh(shape, devices=jax.devices()[:devices])
  rules = sharding_lib.get_rules(rule)
  mesh_shape = dict(mesh.shape)
  batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
  update_config, optim_config = update_configs()
  spec = StateSpec.for_update(config, update_config, optim_config, mesh=mesh, rules=rules)
  out = Plan(name, devices, rule, mesh_shape, config, args.batch * batch_ways, args.decode_batch * batch_ways,
             state_bytes(spec), analytic_state(config, rules, mesh_shape))
  out.analytic_update = analytic_update_peak(config, rules, mesh_shape, args.batch, args.context, bool(config.remat))
  out.analytic_update_other_remat = analytic_update_peak(config, rules, mesh_shape, args.batch, args.context,
                                                         not config.remat)
  out.analytic_decode = analytic_decode(config, rules, mesh_shape, args.decode_batch, args.context)
  if compile_programs:
    out.update = compile_update(spec, update_config, out.rows, args.context, args.steps)
    out.decode = compile_decode(spec, out.decode_rows, args.context)
  return out


def gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def ratio(measured: int, analytic: int) -> str:
  r = measured / analytic if analytic else float("nan")
  return f"{r:.2f}" + (" **!**" if not FLAG_LOW <= r <= FLAG_HIGH else "")


def mesh_name(mesh: dict) -> str:
  return "x".join(str(mesh[a]) for a in sharding_lib.MESH_AXES)


def tables(plans: list[Plan], args) -> list[str]:
  lines = [f"Memory plan: GiB per device; XLA CPU `memory_analysis()` on fake devices; remat {args.remat}, "
           f"scan_layers {not args.no_scan}, params {args.param_dtype}, compute bfloat16; update at {args.batch} "
           f"rows per data shard x {args.context} tokens, {args.steps} step slots; decode {args.decode_batch} rows per "
           f"data shard, cache {args.context}. Mesh = data x fsdp x tensor. Ratio = measured / analytic (**!**: "
           f"outside {FLAG_LOW}-{FLAG_HIGH}).", "",
           "### Train state (from the shardings of `jax.eval_shape`)", "",
           "| model | params | devices | rule | mesh | policy | AdamW | reference | critic | state | analytic state "
           "| ratio |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for p in plans:
    s = p.state
    lines.append(f"| {p.model} | {param_count(p.config) / 1e9:.2f}B | {p.devices} | {p.rule} | {mesh_name(p.mesh)} | "
                 f"{gib(s['policy'])} | {gib(s['optimizer'])} | {gib(s['reference'])} | {gib(s['critic'])} | "
                 f"{gib(s['total'])} | {gib(p.analytic['total'])} | {ratio(s['total'], p.analytic['total'])} |")
  compiled = [p for p in plans if p.update]
  if compiled:
    lines += ["", "### One update (AOT-compiled `prepare` and `optimize`; peak = argument + output - alias + temp)", "",
              "| model | devices | rule | global rows | prepare peak | optimize argument | optimize temp | "
              "optimize alias | optimize peak | analytic peak | ratio | analytic, other remat | compile s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in compiled:
      u, o = p.update, p.update["optimize"]
      lines.append(f"| {p.model} | {p.devices} | {p.rule} | {p.rows} | {gib(u['prepare']['peak'])} | "
                   f"{gib(o['argument'])} | {gib(o['temp'])} | {gib(o['alias'])} | {gib(o['peak'])} | "
                   f"{gib(p.analytic_update)} | {ratio(o['peak'], p.analytic_update)} | "
                   f"{gib(p.analytic_update_other_remat)} | {u['seconds']:.0f} |")
    lines += ["", "### One decode step with its KV cache (policy parameters, cache donated)", "",
              "| model | devices | rule | global rows | KV cache | analytic KV | argument | temp | peak | analytic peak "
              "| ratio | compile s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in compiled:
      d, a = p.decode, p.analytic_decode
      lines.append(f"| {p.model} | {p.devices} | {p.rule} | {p.decode_rows} | {gib(d['cache'])} | {gib(a['cache'])} "
                   f"| {gib(d['argument'])} | {gib(d['temp'])} | {gib(d['peak'])} | {gib(a['peak'])} | "
                   f"{ratio(d['peak'], a['peak'])} | {d['seconds']:.0f} |")
  lines += ["", f"### What fits (update peak <= {HEADROOM:.0%} of the device memory; XLA figure where compiled, else "
            "analytic *a*)", "",
            "| model | devices | rule | update peak | " + " | ".join(f"{c} GB" for c in CAPACITIES_GB) + " |",
            "|---|---:|---|---:|" + "---|" * len(CAPACITIES_GB)]
  for p in plans:
    peak = max(p.update["optimize"]["peak"], p.update["prepare"]["peak"]) if p.update else p.analytic_update
    marks = ["yes" if peak <= HEADROOM * c * 1e9 else "no" for c in CAPACITIES_GB]
    lines.append(f"| {p.model} | {p.devices} | {p.rule} | {gib(peak)}{'' if p.update else ' *a*'} | "
                 + " | ".join(marks) + " |")
  return lines


def main(argv=None):
  parser = arg_parser(__doc__, repeats=1)
  parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b", help="compiled and sized")
  parser.add_argument("--shapes-only", default="qwen2.5-7b,qwen3-8b",
                      help="sized from eval_shape and the analytic model only (no compile); '' for none")
  parser.add_argument("--devices", default="8", help="comma-separated device counts (fake CPU devices)")
  parser.add_argument("--rules", default="dp,fsdp,tp,fsdp_tp")
  parser.add_argument("--batch", type=int, default=8, help="update rows per data shard")
  parser.add_argument("--context", type=int, default=2048, help="tokens per row; also the decode cache length")
  parser.add_argument("--steps", type=int, default=16, help="step slots per episode")
  parser.add_argument("--decode-batch", type=int, default=32, help="decode rows per data shard")
  parser.add_argument("--remat", choices=("none", "full"), default="full")
  parser.add_argument("--no-scan", action="store_true", help="a plain stack of layers instead of nn.scan")
  parser.add_argument("--param-dtype", default="float32")
  args = parser.parse_args(argv)
  devices = [int(v) for v in args.devices.split(",")]
  if max(devices) > jax.device_count():
    parser.error(f"--devices {max(devices)}: only {jax.device_count()} devices (set XLA_FLAGS before jax is imported)")
  jobs = [(m, True) for m in args.models.split(",") if m] + [(m, False) for m in args.shapes_only.split(",") if m]
  plans = []
  for name, compile_programs in jobs:
    for n in devices:
      for rule in args.rules.split(","):
        start = time.perf_counter()
        plans.append(plan(name, n, rule, args, compile_programs))
        print(f"# {name} {n} {rule}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  emit(tables(plans, args), args.markdown)


if __name__ == "__main__":
  main()
