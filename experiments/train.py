"""Train one method on one environment, several seeds at once.

  python experiments/train.py --config=experiments/configs/steppo.py --workdir=runs/steppo
  python experiments/train.py --config=experiments/configs/steppo.py --config.algo.estimator=token_gae \
      --config.algo.whiten=token --workdir=runs/steppo_token_gae
  python experiments/train.py --config=experiments/configs/steppo.py --workdir=runs/steppo --resume

Host environments take their data besides the name (the seeds then run one after another):

  python experiments/train.py --config=experiments/configs/grpo.py --config.env.name=search_qa \
      --config.env.data=data/hotpot_train_v1.1.json --workdir=runs/grpo_search_qa
  python experiments/train.py --config=experiments/configs/grpo.py --config.env.name=textworld \
      --config.env.games=data/tw_games --workdir=runs/grpo_textworld

A Hugging Face checkpoint in its chat format, then exported back (BUILD.md, "Your own checkpoint and data"):

  python experiments/train.py --config=experiments/configs/grpo.py --config.env.name=search_qa \
      --config.env.data=data/hotpot_dev_distractor_v1.json --config.model.checkpoint=$CKPT \
      --config.tokenizer=$CKPT/tokenizer.json --config.chat.template=chatml --workdir=runs/qwen_search_qa
  python experiments/export_hf.py --workdir=runs/qwen_search_qa --seed=0 --out=exports/qwen_search_qa

On a device mesh (config.mesh), one host or several (with a host environment each process steps the envs of its
share of every batch). Every process runs the same command (the
same program, SPMD); --distributed=auto lets JAX find the cluster (TPU pod slices, SLURM, Open MPI), or name it with
--coordinator_address / --num_processes / --process_id (e.g. two CPU processes on one machine):

  python experiments/train.py --config=experiments/configs/steppo.py --config.mesh.data=-1 --workdir=runs/dp
  python experiments/train.py --config=experiments/configs/steppo.py --config.mesh.data=-1 --config.mesh.tensor=4 \
      --distributed=auto --workdir=/shared/runs/steppo_pod
  python experiments/train.py --config=experiments/configs/steppo.py --config.mesh.data=-1 \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0 --workdir=runs/two_processes

Writes metrics.jsonl, eval.jsonl, sft.jsonl, TensorBoard files (tb/), orbax checkpoints (checkpoints/) and config.json
to --workdir, shows a progress bar and prints the held-out summary table at the end (process 0 alone, in a run of
several processes; every process writes its shards of each checkpoint, so --workdir must be one shared directory).
Without --resume a run starts over in --workdir (an earlier run's checkpoints and logs there go); --resume continues
with the same number of processes. A failure the user can act on (nothing to resume, no usable checkpoint, a full or
read-only disk) is one line on stderr and exit status 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `experiments.*`

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import runner  # noqa: E402
from stepjax.train import checkpoint as checkpoint_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/steppo.py", "An ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs and checkpoints go (default runs/<config.name>).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the newest usable checkpoint in --workdir.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "auto: jax.distributed.initialize() before anything touches the devices, with the settings JAX finds itself on a "
    "TPU pod slice, under SLURM or Open MPI (any of the three flags below given explicitly wins). off: one process, "
    "unless --coordinator_address is given.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator: run several processes as one "
                                   "(jax.distributed.initialize); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes - 1 (with "
                                   "--coordinator_address).")


def initialize_distributed() -> None:
  """jax.distributed.initialize(...) as the flags ask, before any device is touched; nothing for one process.

  On CPU the processes' collectives go over gloo (the alternative, mpi, needs an MPI installation); the setting only
  concerns the CPU client, so it is made whatever the platform."""
  explicit = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
              "process_id": _PROCESS_ID.value}
  if _DISTRIBUTED.value == "off":
    if _COORDINATOR.value is None:
      for name, value in explicit.items():
        if value is not None:
          sys.exit(f"{name}: set without --coordinator_address (or --distributed=auto)")
      return
    missing = [name for name, value in explicit.items() if value is None]
    if missing:
      sys.exit(f"{missing[0]}: needed with --coordinator_address (or use --distributed=auto)")
  import jax  # noqa: PLC0415

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**{name: value for name, value in explicit.items() if value is not None})
  except (ValueError, RuntimeError) as error:  # no cluster found, a coordinator that cannot be reached
    message = " ".join(str(error).split())
    sys.exit(f"distributed: jax.distributed.initialize failed: {message}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  initialize_distributed()  # before runner.build touches the devices
  try:
    setup = runner.build(config)  # every field checked before anything compiles
  except ValueError as error:
    sys.exit(f"config.{error}")
  try:
    runner.run(config, workdir, resume=_RESUME.value, setup=setup)
  except (OSError, ValueError, FloatingPointError) as error:
    # Nothing to resume, no usable checkpoint, a full or read-only disk, a field checked at trace time, a halt on a
    # non-finite loss: each is one line by design. Anything else (or a message of several lines) keeps its traceback.
    message = str(error)
    if not message or "\n" in message:
      raise
    if isinstance(error, checkpoint_lib.CheckpointWriteError):
      # orbax may still hold threads of the failed save that wait minutes for a signal; the logs are closed.
      print(message, file=sys.stderr, flush=True)
      os._exit(1)
    sys.exit(message)


if __name__ == "__main__":
  app.run(main)
