"""Export a trained policy as a Hugging Face checkpoint (transformers `AutoModelForCausalLM` + `tokenizers`).

  python experiments/export_hf.py --workdir=runs/grpo_search_qa --seed=0 --out=exports/grpo_search_qa_seed0

Reads the run's config.json (the resolved config `runner.run` wrote) and the seed's latest complete orbax checkpoint
(checkpoints/seed<k> for a host environment; for a pure-JAX one the stacked checkpoint in checkpoints/, the seed an
index along its leading axis; --step picks another saved iteration), restores only the policy's Transformer params
(no optimizer state, critic or value head) and writes to --out:

  config.json, model.safetensors   the policy, by `stepjax.models.hf.save_hf_checkpoint`: the architecture of
                                   model.checkpoint's config.json (Llama / Qwen2 / Qwen3), or the preset's; stored in
                                   the params' float32 unless --dtype=bfloat16; eos_token_id lists the end-of-step and
                                   end-of-episode ids (where stepjax's sampler stops), pad_token_id the pad id;
  tokenizer.json                   the run's tokenizer as trained: its reserved-role tokens, added ones included;
  tokenizer_config.json, special_tokens_map.json, chat_template.jinja
                                   copied from the tokenizer.json's directory when it has them.

The byte and word tokenizers have no tokenizer.json: their runs export the weights alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `experiments.*`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import linen as nn  # noqa: E402

from experiments import runner  # noqa: E402
from experiments.configs import base  # noqa: E402
from stepjax import checks  # noqa: E402
from stepjax.models import hf  # noqa: E402
from stepjax.models.transformer import ModelConfig, Transformer  # noqa: E402
from stepjax.tokenizers import HFTokenizer  # noqa: E402
from stepjax.train import checkpoint as checkpoint_lib  # noqa: E402

FLAGS = flags.FLAGS
# Files of a Hugging Face tokenizer directory that are copied next to the exported tokenizer.json.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = ("float32", "bfloat16")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to workdir/config.json; sections an older run lacks take base.py's defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    checks.fail("workdir", f"{path} is missing (a run's directory holds the config.json that runner.run writes)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  defaults = base.get_config()
  for name in defaults:
    if name not in config:
      config[name] = defaults[name]
  return config


def policy_model_config(config: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
  """The policy's ModelConfig as the run built it (float32 params), without reading any weights."""
  m = config.model
  if not m.checkpoint:
    return runner._model_config(config, tokenizer)[0]
  if not os.path.isdir(m.checkpoint):
    checks.fail("model.checkpoint", f"{m.checkpoint} is not a directory; the run started from it, and its config.json "
                "describes the policy")
  # As load_hf_checkpoint builds it (tied embeddings when no LM head is stored), from the headers only.
  return hf.load_hf_config(m.checkpoint, param_dtype="float32", dtype="float32")


def _seed_checkpoint(workdir: str, config: ml_collections.ConfigDict, seed: int) -> tuple[str, int | None]:
  """(checkpoint directory, index along the stacked seed axis or None) of a seed of the run."""
  t = config.train
  seeds = list(range(t.seed_offset, t.seed_offset + t.seeds))
  if seed not in seeds:
    checks.fail("seed", f"{seed} is not a seed of the run in {workdir}; its seeds are {seeds}")
  directory = os.path.join(workdir, "checkpoints")
  if config.env.name in runner.HOST_ENVS:
    return os.path.join(directory, f"seed{seed}"), None
  return directory, seeds.index(seed)


def restore_policy(directory: str, model_config: ModelConfig, *, num_seeds: int | None = None,
                   step: int | None = None) -> tuple[dict, int]:
  """The policy's Transformer params ([num_seeds, ...] stacked when given) from the latest complete checkpoint in
  `directory` (or `step`), nothing else of the TrainState read. -> (params, step)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint.directory: {directory} does not exist")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  state_item = checkpoint_lib._STATE_ITEM  # the item names stepjax.train.checkpoint saves under
  manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                  item_names=(state_item, checkpoint_lib._EXTRA_ITEM))
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"checkpoint.directory: {directory} holds no complete checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"checkpoint.step: {step} is not a complete checkpoint in {directory}; available: "
                              f"{sorted(steps)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = nn.unbox(jax.eval_shape(lambda: Transformer(model_config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    lead = (num_seeds,) if num_seeds is not None else ()
    policy = jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + x.shape, x.dtype, sharding=device), shapes)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device, global_shape=x.shape, dtype=x.dtype),
                                policy)
    restored = manager.restore(step, args=ocp.args.Composite(**{state_item: ocp.args.PyTreeRestore(
        {"params": {"policy": policy}}, restore_args={"params": {"policy": restore_args}}, partial_restore=True)}))
    return restored[state_item]["params"]["policy"], int(step)
  finally:
    manager.close()


def export(workdir: str, out: str, *, seed: int | None = None, step: int | None = None,
           dtype: str = "float32") -> dict:
  """Writes seed `seed`'s policy (default: the run's first seed) at checkpoint `step` (default: the latest) of the
  run in `workdir` to `out` (see the module docstring). Returns {"seed", "step", "files"}."""
  checks.check_choice(dtype, "dtype", DTYPES)
  config = load_run_config(workdir)
  seed = config.train.seed_offset if seed is None else seed
  tokenizer = runner._tokenizer(config)
  model_config = policy_model_config(config, tokenizer)
  directory, index = _seed_checkpoint(workdir, config, seed)
  params, step = restore_policy(directory, model_config, step=step,
                                num_seeds=None if index is None else config.train.seeds)
  if index is not None:
    params = jax.tree.map(lambda x: x[index], params)
  ids = {"eos_token_id": [tokenizer.end_of_step_id, tokenizer.eos_id], "pad_token_id": tokenizer.pad_id}
  hf.save_hf_checkpoint(model_config, params, out, dtype=jnp.dtype(dtype), extra_config=ids)
  files = ["config.json", "model.safetensors"]
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.library_tokenizer.save(os.path.join(out, "tokenizer.json"))
    files.append("tokenizer.json")
    source = os.path.dirname(tokenizer.path)
    for name in TOKENIZER_SIDE_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
        files.append(name)
  return {"seed": seed, "step": step, "files": files}


def _define_flags() -> None:
  """Flags are defined when run as a script only (experiments.train, importable next to this, has --workdir too)."""
  flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/).", required=True)
  flags.DEFINE_string("out", None, "Where the Hugging Face checkpoint goes.", required=True)
  flags.DEFINE_integer("seed", None, "The seed to export (default: the run's first).")
  flags.DEFINE_integer("step", None, "The checkpointed iteration to export (default: the latest).")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the stored weights.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only directory is read-only
  try:
    info = export(FLAGS.workdir, FLAGS.out, seed=FLAGS.seed, step=FLAGS.step, dtype=FLAGS.dtype)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(str(error))
  print(f"seed {info['seed']}, iteration {info['step']} -> {FLAGS.out}: {', '.join(info['files'])}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
