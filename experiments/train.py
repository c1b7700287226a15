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

Writes metrics.jsonl, eval.jsonl, sft.jsonl, TensorBoard files (tb/), orbax checkpoints (checkpoints/) and config.json
to --workdir, shows a progress bar and prints the held-out summary table at the end. Without --resume a run starts
over in --workdir (an earlier run's checkpoints and logs there go). A failure the user can act on (nothing to resume,
no usable checkpoint, a full or read-only disk) is one line on stderr and exit status 1.
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
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
