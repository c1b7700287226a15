"""The kill drill (drills/kill.py) at suite size: SIGKILL experiments/train.py before its first checkpoint, while
orbax writes one and right after a log line (leaving a torn line), resume each time; logs and the final TrainState must
equal an uninterrupted run's bit for bit."""

import pytest

from drills import kill

# Subprocess runs of train.py: too slow for the suite's 10 minutes, run by `make drills` (CI's drills step).
pytestmark = pytest.mark.drill


def test_three_kills_and_resumes_end_like_the_uninterrupted_run(tmp_path):
  result = kill.run_drill(3, seed=1, kinds=("before_checkpoint", "checkpoint", "log"), tear=1.0,
                          root=str(tmp_path))
  assert result.ok, result.details()
  assert result.line() == "kill drill: 3/3 kills survived, logs and params equal to the uninterrupted run"
  assert [k.kind for k in result.kills] == ["before_checkpoint", "checkpoint", "log"]
  # The kill before the first checkpoint: --resume said so in one line (no traceback), then a plain rerun started over.
  assert len(result.nothing_to_resume) >= 1 and result.restarts >= 1
  assert all(kill.NOTHING_TO_RESUME.match(line) for line in result.nothing_to_resume)
  assert result.nothing_to_resume[0].startswith(f"checkpoint.directory: {tmp_path / 'killed' / 'checkpoints'} ")
  assert not result.kills[0].resumed
  # The log kill left a torn last line, and the resume that followed dropped it (the logs compared equal above).
  assert result.kills[2].torn in ("metrics.jsonl", "eval.jsonl")
