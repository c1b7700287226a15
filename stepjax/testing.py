"""Random but valid `EpisodeBatch`es for tests and benchmarks (numpy, host side), a generated multi-hop QA file in the
HotpotQA layout (`write_multihop_questions`), and the plain-numpy references that several test files check the library
against (loops over elements, float64, nothing shared with the library)."""

from __future__ import annotations

import json
import random

import numpy as np

from stepjax.types import EpisodeBatch


def random_episode_batch(
    seed: int,
    batch_size: int = 8,
    max_len: int = 96,
    max_steps: int = 6,
    *,
    vocab_size: int = 50,
    max_prompt: int = 8,
    max_action: int = 6,
    max_obs: int = 5,
    num_groups: int | None = None,
    fill: bool = False,
    reward_density: float = 0.5,
) -> EpisodeBatch:
  """A ragged batch: random prompt, step and observation lengths, random step counts (0 included unless
  `fill`), a mix of terminated, truncated and (rarely) neither. `fill=True` gives every episode `max_steps`
  steps when they fit. Observations may be empty. Group ids lie in [0, num_groups)."""
  rng = np.random.default_rng(seed)
  b, l, s = batch_size, max_len, max_steps
  num_groups = num_groups or max(1, b // 2)
  tokens = np.zeros((b, l), np.int32)
  step_ids = np.full((b, l), -1, np.int32)
  logprobs = np.zeros((b, l), np.float32)
  step_start = np.zeros((b, s), np.int32)
  step_len = np.zeros((b, s), np.int32)
  step_rewards = np.zeros((b, s), np.float32)
  step_mask = np.zeros((b, s), bool)
  seq_len = np.zeros((b,), np.int32)
  for i in range(b):
    want = s if fill else int(rng.integers(0, s + 1))
    pos = min(int(rng.integers(1, max_prompt + 1)), l)
    tokens[i, :pos] = rng.integers(1, vocab_size, pos)
    for t in range(want):
      n_act = int(rng.integers(1, max_action + 1))
      n_obs = int(rng.integers(0, max_obs + 1))
      if pos + n_act > l:
        break
      n_obs = min(n_obs, l - pos - n_act)
      tokens[i, pos:pos + n_act] = rng.integers(1, vocab_size, n_act)
      step_ids[i, pos:pos + n_act] = t
      logprobs[i, pos:pos + n_act] = -rng.exponential(1.0, n_act)
      step_start[i, t], step_len[i, t], step_mask[i, t] = pos, n_act, True
      if rng.random() < reward_density:
        step_rewards[i, t] = rng.normal()
      pos += n_act
      tokens[i, pos:pos + n_obs] = rng.integers(1, vocab_size, n_obs)
      pos += n_obs
    seq_len[i] = pos
  kind = rng.choice(3, size=b, p=[0.45, 0.45, 0.10])  # terminated, truncated, neither (treated as terminal)
  return EpisodeBatch(
      tokens=tokens, action_mask=step_ids >= 0, step_ids=step_ids, logprobs=logprobs, step_start=step_start,
      step_len=step_len, step_rewards=step_rewards, step_mask=step_mask, seq_len=seq_len,
      terminated=kind == 0, truncated=kind == 1,
      group_id=rng.integers(0, num_groups, b).astype(np.int32),
      bootstrap_pos=np.maximum(seq_len - 1, 0).astype(np.int32))


def np_whiten(x, mask, shift_mean=True, eps=1e-8) -> np.ndarray:
  """Reference masked whitening: (x - mean) / sqrt(var + eps) over the masked elements, var with Bessel's correction
  (none for a single element), 0 off the mask and everywhere for an empty mask. Any shape, float64."""
  picked = np.asarray(x, np.float64)[mask]
  if picked.size == 0:
    return np.zeros(np.shape(x))
  mean = picked.mean()
  var = picked.var(ddof=1) if picked.size > 1 else 0.0
  out = (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return np.where(mask, out, 0.0)


def np_groups(keys, valid) -> dict:
  """Reference grouping: {key: [indices of the valid items with that key]}, in first-seen order."""
  groups = {}
  for i, (key, ok) in enumerate(zip(keys, valid)):
    if ok:
      groups.setdefault(key, []).append(i)
  return groups


ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
TRADES = ("weaver", "glassblower", "cartographer", "beekeeper", "luthier")


def _word(rng: random.Random, syllables: int) -> str:
  return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)).capitalize()


def write_multihop_questions(path, count: int = 20, seed: int = 0) -> list[dict]:
  """Writes `count` bridge questions "Which town was the teacher of A born in?" as a HotpotQA JSON list: A's paragraph
  names the teacher B (fact 1), B's paragraph names the town (fact 1); two other questions' paragraphs are the
  distractors (same title, same text, as HotpotQA repeats them). Returns the raw records."""
  rng, names = random.Random(seed), set()

  def fresh(syllables):
    while (name := _word(rng, syllables) + " " + _word(rng, syllables)) in names:
      pass
    names.add(name)
    return name

  triples = [(fresh(2), fresh(2), _word(rng, 3)) for _ in range(count)]  # student, teacher, town
  paragraphs = {}
  for student, teacher, town in triples:
    paragraphs[student] = [f"{student} was a {rng.choice(TRADES)}.", f" {student} trained with {teacher}."]
    paragraphs[teacher] = [f"{teacher} was a {rng.choice(TRADES)}.", f" {teacher} was born in {town}."]
  records = []
  for i, (student, teacher, town) in enumerate(triples):
    others = [t for t in paragraphs if t not in (student, teacher)]
    context = [[title, paragraphs[title]] for title in [student, teacher, *rng.sample(others, 2)]]
    rng.shuffle(context)
    records.append({"_id": f"h{i:03d}", "question": f"Which town was the teacher of {student} born in?",
                    "answer": town, "type": "bridge", "level": "easy",
                    "supporting_facts": [[student, 1], [teacher, 1]], "context": context})
  with open(path, "w") as f:
    json.dump(records, f)
  return records
