"""Expert episode sets for SFT: `EpisodeBatch` rows written as a TFDS dataset and read back as padded batches.

An episode set is made once from any iterable of `EpisodeBatch`es (scripted-expert rollouts, converted logs) and
read many times by index, without TensorFlow:

    builder = write_episodes(expert_batches(), "/data/tfds", "lookup_qa_expert")   # EpisodeSet + download_and_prepare
    source = builder.as_data_source("train")                                          # random access
    batch = read_episodes(source, [4, 0, 7], max_len=256, max_steps=8)              # an EpisodeBatch (numpy)

One record per episode row, holding every `EpisodeBatch` field under its own name, stored without padding:
per-token fields (tokens, action_mask, step_ids, logprobs) keep their first `seq_len` entries, per-step fields
(step_start, step_len, step_rewards, step_mask) their first n entries (n = the row's valid steps, a prefix), and the
per-episode scalars are kept as they are. dtypes are those `EpisodeBatch` documents (int32, bool, float32): an
integer outside int32 is refused, a float64 logprob or reward is rounded to float32 (its documented dtype).

Because padding is not stored, the writer checks that it is the padding `read_episodes` puts back: past seq_len
tokens 0, action_mask False, step_ids -1, logprobs 0; past the valid steps step_start, step_len, step_rewards 0 and
step_mask False. A row with anything else there is refused (one line naming the batch, row and field), not
silently changed. Records are stored in the order they were given (`disable_shuffling`): record i of a split is the
i-th row written to it; shuffle when reading (`reading.batches`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from stepjax.checks import check_array, check_int, fail
from stepjax.data.reading import read_records
from stepjax.types import EpisodeBatch

# field -> (dtype, axis kind: "token" [B, L], "step" [B, S] or "episode" [B], check kind, padding value)
FIELDS = {
    "tokens": (np.int32, "token", "int", 0),
    "action_mask": (np.bool_, "token", "bool", False),
    "step_ids": (np.int32, "token", "int", -1),
    "logprobs": (np.float32, "token", "float", 0.0),
    "step_start": (np.int32, "step", "int", 0),
    "step_len": (np.int32, "step", "int", 0),
    "step_rewards": (np.float32, "step", "float", 0.0),
    "step_mask": (np.bool_, "step", "bool", False),
    "seq_len": (np.int32, "episode", "int", 0),
    "terminated": (np.bool_, "episode", "bool", False),
    "truncated": (np.bool_, "episode", "bool", False),
    "group_id": (np.int32, "episode", "int", 0),
    "bootstrap_pos": (np.int32, "episode", "int", 0),
}
_INT32 = np.iinfo(np.int32)


def _feature(dtype, axis: str):
  return tfds.features.Scalar(dtype=dtype) if axis == "episode" else tfds.features.Tensor(shape=(None,), dtype=dtype)


FEATURES = tfds.features.FeaturesDict({name: _feature(dtype, axis) for name, (dtype, axis, _, _) in FIELDS.items()})


def _host_fields(batch: Any, where: str) -> dict[str, np.ndarray]:
  """Checks shapes and dtype kinds; returns the fields as numpy arrays in the stored dtypes."""
  if not isinstance(batch, EpisodeBatch):
    fail(where, f"expected an EpisodeBatch, got {type(batch).__name__}")
  check_array(batch.tokens, f"{where}.tokens", rank=2, dims="[B, L]")
  check_array(batch.step_start, f"{where}.step_start", rank=2, dims="[B, S]")
  (b, l), s = batch.tokens.shape, batch.step_start.shape[1]
  shapes = {"token": (b, l), "step": (b, s), "episode": (b,)}
  out = {}
  for name, (dtype, axis, kind, _) in FIELDS.items():
    x = np.asarray(check_array(getattr(batch, name), f"{where}.{name}", kind, shape=shapes[axis]))
    if kind == "int" and x.size and (x.min() < _INT32.min or x.max() > _INT32.max):
      fail(f"{where}.{name}", f"values outside int32 (min {x.min()}, max {x.max()})")
    out[name] = x.astype(dtype)
  return out


def _step_counts(x: dict[str, np.ndarray], where: str) -> np.ndarray:
  """[B] number of valid steps, checking that seq_len fits the row and valid steps are a prefix."""
  length, mask = x["tokens"].shape[1], x["step_mask"]
  bad = np.flatnonzero((x["seq_len"] < 0) | (x["seq_len"] > length))
  if bad.size:
    fail(f"{where}.seq_len", f"row {bad[0]}: {x['seq_len'][bad[0]]} is outside [0, {length}]")
  counts = mask.sum(axis=1)
  prefix = np.arange(mask.shape[1])[None, :] < counts[:, None]
  bad = np.flatnonzero(np.any(mask != prefix, axis=1))
  if bad.size:
    fail(f"{where}.step_mask", f"row {bad[0]}: valid steps must be a prefix, got {mask[bad[0]].astype(int).tolist()}")
  return counts


def _check_padding(x: dict[str, np.ndarray], counts: np.ndarray, where: str) -> None:
  ends = {"token": x["seq_len"], "step": counts}
  for name, (_, axis, _, pad) in FIELDS.items():
    if axis == "episode":
      continue
    values = x[name]
    past = np.arange(values.shape[1])[None, :] >= ends[axis][:, None]
    bad = np.flatnonzero(np.any(past & (values != pad), axis=1))
    if bad.size:
      end = "its seq_len" if axis == "token" else "its valid steps"
      fail(f"{where}.{name}", f"row {bad[0]} holds values other than the padding {pad!r} past {end}; padding is "
                              "not stored, so it must be what the reader puts back")


def episode_rows(batch: EpisodeBatch, where: str = "episodes") -> Iterator[dict[str, np.ndarray]]:
  """One stored record per row of `batch`, without padding (checked first: module docstring)."""
  x = _host_fields(batch, where)
  counts = _step_counts(x, where)
  _check_padding(x, counts, where)
  ends = {"token": x["seq_len"], "step": counts}
  for r in range(x["tokens"].shape[0]):
    yield {name: (x[name][r] if axis == "episode" else x[name][r, :ends[axis][r]])
           for name, (_, axis, _, _) in FIELDS.items()}


def pad_episodes(records: Sequence[Mapping[str, Any]], *, max_len: int, max_steps: int) -> EpisodeBatch:
  """Stored records -> an EpisodeBatch [len(records), max_len] with max_steps step slots (numpy arrays)."""
  check_int(max_len, "max_len", 1)
  check_int(max_steps, "max_steps", 1)
  b = len(records)
  sizes = {"token": max_len, "step": max_steps}
  out = {name: np.full((b,) if axis == "episode" else (b, sizes[axis]), pad, dtype)
         for name, (dtype, axis, _, pad) in FIELDS.items()}
  for i, record in enumerate(records):
    for name, (dtype, axis, _, _) in FIELDS.items():
      value = np.asarray(record[name], dtype)
      if axis == "episode":
        out[name][i] = value
        continue
      if len(value) > sizes[axis]:
        limit = "max_len" if axis == "token" else "max_steps"
        fail(limit, f"record {i} has {len(value)} {'tokens' if axis == 'token' else 'steps'} > {limit} "
                    f"{sizes[axis]}")
      out[name][i, :len(value)] = value
  return EpisodeBatch(**out)


def read_episodes(source: Any, indices: Sequence[int] | np.ndarray, *, max_len: int, max_steps: int) -> EpisodeBatch:
  """The records at `indices` of a data source (`builder.as_data_source(split)`) as one padded EpisodeBatch."""
  return pad_episodes(read_records(source, indices), max_len=max_len, max_steps=max_steps)


class EpisodeSet(tfds.core.GeneratorBasedBuilder):
  """Episode rows from a user's iterable of EpisodeBatches (module docstring).

  episodes: an iterable of EpisodeBatch (all into the split "train"), or a mapping split name -> iterable; needed
  only to prepare, not to read an existing set. Name the set with config=tfds.core.BuilderConfig(name=...) or
  `episode_config(name)`; TFDS reuses a set already prepared under data_dir/stepjax_episodes/<name>/<version>.
  """

  name = "stepjax_episodes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "EpisodeBatch rows without padding."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

  def __init__(self, *, episodes: Iterable[EpisodeBatch] | Mapping[str, Iterable[EpisodeBatch]] | None = None,
               **kwargs):
    self._episodes = episodes
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=FEATURES, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    if self._episodes is None:
      fail("episodes", f"{self.name}/{self.builder_config.name} is not prepared in {self.data_dir} and no "
                       "episodes were given to write")
    splits = self._episodes if isinstance(self._episodes, Mapping) else {"train": self._episodes}
    return {split: self._generate_examples(batches, split) for split, batches in splits.items()}

  def _generate_examples(self, batches: Iterable[EpisodeBatch], split: str):
    index = 0
    for k, batch in enumerate(batches):
      for row in episode_rows(batch, f"episodes[{split}][{k}]"):
        yield index, row
        index += 1
    if index == 0:
      fail(f"episodes[{split}]", "no episode rows to write")


def episode_config(name: str, description: str | None = None) -> tfds.core.BuilderConfig:
  return tfds.core.BuilderConfig(name=name, description=description)


def write_episodes(episodes: Iterable[EpisodeBatch] | Mapping[str, Iterable[EpisodeBatch]],
                   data_dir: str | os.PathLike, name: str) -> EpisodeSet:
  """Write (or reuse, if `name` is already prepared under data_dir) an episode set; returns its builder."""
  builder = EpisodeSet(data_dir=os.fspath(data_dir), config=episode_config(name), episodes=episodes,
                       file_format="array_record")
  builder.download_and_prepare()
  return builder
