"""Disk drill: a checkpoint or log that cannot be written (full disk, read-only directory) stops experiments/train.py
with one line, the previous checkpoint stays intact, and --resume with space again ends like an uninterrupted run.

    python -m drills.disk

Runs the kill drill's tiny config (`drills.kill`) through `experiments/train.py`: 2 iterations in a workdir, then
`--resume` towards 4 iterations under each failure:

  checkpoint disk full   the checkpoint directory is a small tmpfs, filled to the last byte (where tmpfs cannot be
                         mounted: a 64 KiB file-size limit, RLIMIT_FSIZE, on the run, so orbax's data file fails with
                         "File too large");
  checkpoint read-only   that tmpfs remounted read-only (not root: chmod 0o555; root without tmpfs: skipped, chmod
                         does not stop root);
  workdir full           the workdir itself a filled tmpfs (or a 1 KiB file-size limit): the first log write fails.

Each must exit with status 1 and exactly one line on stderr, "checkpoint: cannot write to <dir>: <reason>; the
previous checkpoint (step 2) is intact" or "log: cannot write to <file>: <reason>", and checkpoint 2 must still
restore whole. Then, with space again, `--resume` runs to 4 iterations and its logs and final TrainState must equal
an uninterrupted run's. Prints "disk drill: 3/3 write failures were one line with checkpoint 2 intact; ...".
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from drills import kill

ITERATIONS, FIRST = 4, 2
TMPFS_KIB = 8192


@dataclasses.dataclass
class Check:
  name: str
  how: str  # how the failure was made
  ok: bool
  detail: str

  def line(self) -> str:
    return f"[{'ok' if self.ok else 'FAIL'}] {self.name} ({self.how}): {self.detail}"


def _mount(path: str, size_kib: int = TMPFS_KIB) -> bool:
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
                        capture_output=True).returncode == 0


def _remount(path: str, mode: str) -> None:
  subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True, capture_output=True)


def fill(path: str) -> str:
  """Fills the file system of `path` to the last byte; returns the filler file (delete it to free the space)."""
  filler = os.path.join(path, ".filler")
  fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  try:
    while True:
      os.write(fd, b"\0" * 65536)
  except OSError as error:
    if error.errno != errno.ENOSPC:
      raise
  finally:
    os.close(fd)
  return filler


def _file_size_limit(limit: int):
  """A preexec_fn: writes past `limit` bytes fail with EFBIG ("File too large") instead of killing the process."""

  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  return apply


def _train(workdir: str, env: dict, iterations: int, resume: bool, preexec=None) -> subprocess.CompletedProcess:
  return subprocess.run(kill.train_command(workdir, iterations=iterations, resume=resume), cwd=kill.REPO, env=env,
                        capture_output=True, text=True, preexec_fn=preexec)


def _failure_line(done: subprocess.CompletedProcess, pattern: str) -> tuple[bool, str]:
  line = kill._one_line_error(done.stderr)
  if done.returncode != 1 or line is None:
    return False, f"exit {done.returncode}, stderr not one line: {done.stderr.strip()[-600:]!r}"
  if not re.fullmatch(pattern, line):
    return False, f"unexpected line {line!r}"
  return True, repr(line)


def _intact(checkpoints: str) -> tuple[bool, str]:
  """Checkpoint FIRST is the newest and restores whole."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments import runner  # noqa: PLC0415
  from stepjax.train import checkpoint as checkpoint_lib  # noqa: PLC0415

  setup = runner.build(kill.make_config(ITERATIONS))
  keys = jnp.stack([jax.random.key(seed) for seed in setup.seeds])
  abstract = jax.eval_shape(runner._programs(setup, False)["init"], keys, None)
  printed = []
  try:
    _, step, extra = checkpoint_lib.restore_usable_checkpoint(checkpoints, abstract, print_fn=printed.append)
  except (OSError, ValueError) as error:
    return False, f"checkpoint {FIRST} does not restore: {error}"
  if step != FIRST or printed or extra.get("iteration") != FIRST:
    return False, f"restored checkpoint {step} ({printed})"
  return True, f"checkpoint {FIRST} restores whole"


def run_drill(root: str | None = None, print_fn=None) -> list[Check]:
  """The drill (module docstring); one Check per failure, then the final resume."""
  owned = root is None
  root = tempfile.mkdtemp(prefix="disk_drill_") if owned else root
  log = print_fn or (lambda _: None)
  mounts = []
  try:
    env = kill.train_env(os.path.join(root, "jax_cache"))
    reference, workdir = os.path.join(root, "uninterrupted"), os.path.join(root, "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    done = _train(reference, env, ITERATIONS, resume=False)
    if done.returncode:
      return [Check("uninterrupted run", "-", False, done.stderr.strip()[-600:])]
    tmpfs = _mount(workdir)
    if tmpfs:
      mounts.append(workdir)
      tmpfs = _mount(checkpoints)
      if tmpfs:
        mounts.append(checkpoints)
    log(f"tmpfs: {'workdir and checkpoints' if tmpfs else 'not mountable here, file-size limits instead'}")
    done = _train(workdir, env, FIRST, resume=False)
    if done.returncode:
      return [Check(f"first {FIRST} iterations", "-", False, done.stderr.strip()[-600:])]
    checks, intact_pattern = [], rf"; the previous checkpoint \(step {FIRST}\) is intact"
    ckpt_pattern = re.escape(f"checkpoint: cannot write to {os.path.abspath(checkpoints)}: ")

    # 1. The checkpoint disk is full.
    if tmpfs:
      filler, how = fill(checkpoints), f"{TMPFS_KIB // 1024} MiB tmpfs filled"
      done = _train(workdir, env, ITERATIONS, resume=True)
      os.remove(filler)
      reason = os.strerror(errno.ENOSPC)
    else:
      how, reason = "64 KiB file-size limit", os.strerror(errno.EFBIG)
      done = _train(workdir, env, ITERATIONS, resume=True, preexec=_file_size_limit(65536))
    ok, detail = _failure_line(done, ckpt_pattern + re.escape(reason) + intact_pattern)
    intact, what = _intact(checkpoints)
    checks.append(Check("checkpoint disk full", how, ok and intact, f"{detail}; {what}"))
    log(checks[-1].line())

    # 2. The checkpoint directory is read-only.
    if tmpfs or os.geteuid() != 0:
      if tmpfs:
        _remount(checkpoints, "ro")
        how, reason = "tmpfs remounted read-only", os.strerror(errno.EROFS)
      else:
        os.chmod(checkpoints, 0o555)
        how, reason = "chmod 0o555", os.strerror(errno.EACCES)
      try:
        done = _train(workdir, env, ITERATIONS, resume=True)
      finally:
        _remount(checkpoints, "rw") if tmpfs else os.chmod(checkpoints, 0o755)
      ok, detail = _failure_line(done, ckpt_pattern + re.escape(reason) + intact_pattern)
      intact, what = _intact(checkpoints)
      checks.append(Check("checkpoint directory read-only", how, ok and intact, f"{detail}; {what}"))
    else:
      checks.append(Check("checkpoint directory read-only", "skipped", True, "root without tmpfs: chmod does not "
                          "stop root"))
    log(checks[-1].line())

    # 3. The workdir (the logs) is full.
    log_pattern = rf"log: cannot write to {re.escape(workdir)}/\S+: "
    if tmpfs:
      filler, how = fill(workdir), "workdir tmpfs filled"
      done = _train(workdir, env, ITERATIONS, resume=True)
      os.remove(filler)
      reason = os.strerror(errno.ENOSPC)
    else:
      how, reason = "1 KiB file-size limit", os.strerror(errno.EFBIG)
      done = _train(workdir, env, ITERATIONS, resume=True, preexec=_file_size_limit(1024))
    ok, detail = _failure_line(done, log_pattern + re.escape(reason))
    intact, what = _intact(checkpoints)
    checks.append(Check("workdir full", how, ok and intact, f"{detail}; {what}"))
    log(checks[-1].line())

    # With space again: --resume completes like the uninterrupted run.
    done = _train(workdir, env, ITERATIONS, resume=True)
    if done.returncode:
      checks.append(Check("--resume with space again", "-", False, done.stderr.strip()[-600:]))
    else:
      problems = kill._compare_logs(reference, workdir) + kill._compare_states(reference, workdir, ITERATIONS)
      checks.append(Check("--resume with space again", "-", not problems,
                          problems[0] if problems else "logs and final TrainState equal to the uninterrupted run"))
    log(checks[-1].line())
    return checks
  finally:
    for path in reversed(mounts):
      subprocess.run(["umount", "-l", path], capture_output=True)
    if owned:
      shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=None, help="keep the workdirs here (default: a temporary directory)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  checks = run_drill(args.root)
  failures = checks[:-1]
  passed = sum(check.ok for check in failures)
  final = checks[-1].ok if len(checks) > 1 else False
  print(f"disk drill: {passed}/{len(failures)} write failures were one line with checkpoint {FIRST} intact; "
        f"resume with space again {'equals' if final else 'does NOT equal'} the uninterrupted run")
  for check in checks:
    print(f"  {check.line()}")
  print(f"({time.perf_counter() - start:.1f} s)")
  return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
  sys.exit(main())
