"""`MultihopQA`: a TFDS builder that writes a local multi-hop QA file as array_record, read back without TensorFlow.

The file is the user's (these datasets are not downloaded here): `config.path`, or else `config.filename` (the
format's usual training file name by default) inside TFDS's manual_dir. `multihop_qa.load_records` parses it
(strictly, see there); the builder writes the records in file order to two splits:

  train      every record whose id hashes to [held_out_fraction, 1)
  held_out   the rest (absent when held_out_fraction is 0)

The split of a record is a function of its id only (the first 8 bytes of sha256(id) as a fraction of 2**64), so it
is the same on every machine and run, the splits never overlap, and a record keeps its split when the file grows.
A split that no record falls into is an error, not an empty split.

    builder = prepare_qa("hotpot_train_v1.1.json", "hotpotqa", data_dir="/data/tfds", held_out_fraction=0.05)
    source = builder.as_data_source("held_out")           # random access, ArrayRecordDataSource
    record = multihop_qa.decode_record(source[0])         # the common dict

Stored layout: the record's strings as Text, supporting_facts as a sequence of {title, sentence_index}, the context
as a sequence of {title, num_sentences} plus one flat `context_sentences` list (TFDS serialises a list of lists of
text only through TensorFlow; this layout needs none). What was skipped while parsing is kept in
`builder.info.metadata` (dataset-level, saved next to the data) and logged.

TFDS reuses data already prepared under data_dir/stepjax_multihop_qa/<config name>/<version>; `qa_config` derives
the config name from the format and a hash of the path and options, so another file or option prepares anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from stepjax.checks import check_bool, check_choice, check_number, fail
from stepjax.data.multihop_qa import FORMATS, encode_record, load_records

SPLITS = ("train", "held_out")
DEFAULT_FILENAMES = {"hotpotqa": "hotpot_train_v1.1.json", "2wikimultihopqa": "train.json",
                     "musique": "musique_ans_v1.0_train.jsonl"}


@dataclasses.dataclass(eq=False)
class MultihopQAConfig(tfds.core.BuilderConfig):
  """format: one of FORMATS; path: the file (None: `filename` in manual_dir); the other fields as in `qa_config`."""

  format: str = "hotpotqa"
  path: str | None = None
  filename: str | None = None
  held_out_fraction: float = 0.1
  skip_invalid: bool = False
  skip_unanswerable: bool = False

  def validate(self) -> MultihopQAConfig:
    check_choice(self.format, "format", FORMATS)
    check_number(self.held_out_fraction, "held_out_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
    check_bool(self.skip_invalid, "skip_invalid")
    check_bool(self.skip_unanswerable, "skip_unanswerable")
    return self


def qa_config(format: str, path: str | os.PathLike | None = None, *, name: str | None = None,
              filename: str | None = None, held_out_fraction: float = 0.1, skip_invalid: bool = False,
              skip_unanswerable: bool = False) -> MultihopQAConfig:
  """A validated config; name defaults to `<format>_<8 hex digits of the path and options>`."""
  path = os.path.abspath(os.fspath(path)) if path is not None else None
  config = MultihopQAConfig(name="unnamed", format=format, path=path, filename=filename,
                            held_out_fraction=held_out_fraction, skip_invalid=skip_invalid,
                            skip_unanswerable=skip_unanswerable).validate()
  if name is None:
    options = json.dumps([path, filename, float(held_out_fraction), skip_invalid, skip_unanswerable])
    name = f"{format}_{hashlib.sha256(options.encode()).hexdigest()[:8]}"
  config.name = name
  return config


def held_out(record_id: str, fraction: float) -> bool:
  """Whether a record with this id belongs to the held_out split (stable: sha256 of the id)."""
  value = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")
  return value < fraction * 2**64


_TEXT = tfds.features.Text()

FEATURES = tfds.features.FeaturesDict({
    "id": _TEXT, "question": _TEXT, "answer": _TEXT, "type": _TEXT, "level": _TEXT, "source": _TEXT,
    "supporting_facts": tfds.features.Sequence({"title": _TEXT, "sentence_index": np.int32}),
    "context": tfds.features.Sequence({"title": _TEXT, "num_sentences": np.int32}),
    "context_sentences": tfds.features.Sequence(_TEXT),
})


class MultihopQA(tfds.core.GeneratorBasedBuilder):
  """Multi-hop QA records from a local HotpotQA / 2WikiMultihopQA / MuSiQue file (module docstring)."""

  name = "stepjax_multihop_qa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Common record layout; train / held_out split by a hash of the id."}
  BUILDER_CONFIGS = [MultihopQAConfig(name=f, format=f) for f in FORMATS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the dataset file in manual_dir under the config's filename (defaults: "
      + ", ".join(f"{f}: {n}" for f, n in DEFAULT_FILENAMES.items())
      + "), or give its path in the BuilderConfig (`qa_config(format, path)`).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=FEATURES, disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict())

  def _source_path(self, dl_manager) -> str:
    config = self.builder_config
    if config.path is not None:
      return config.path
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:
      fail("manual_dir", f"no path in the config and no file in manual_dir; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return os.fspath(manual_dir / (config.filename or DEFAULT_FILENAMES[config.format]))

  def _split_generators(self, dl_manager):
    config = self.builder_config.validate()
    report = load_records(self._source_path(dl_manager), config.format, skip_invalid=config.skip_invalid,
                          skip_unanswerable=config.skip_unanswerable)
    self.report = report
    self.info.metadata.update(path=report.path, format=report.format, records=len(report.records),
                              skipped_invalid=len(report.skipped_invalid), unanswerable=report.unanswerable,
                              skipped_unanswerable=report.skipped_unanswerable)
    splits = {name: [] for name in SPLITS}
    for record in report.records:
      splits["held_out" if held_out(record["id"], config.held_out_fraction) else "train"].append(record)
    if config.held_out_fraction == 0:
      del splits["held_out"]
    for name, records in splits.items():
      if not records:
        fail("held_out_fraction", f"{config.held_out_fraction} leaves the {name} split of {report.path} empty "
                                  f"({len(report.records)} records)")
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record["id"], encode_record(record)


def prepare_qa(path: str | os.PathLike | None, format: str, data_dir: str | os.PathLike, *,
               manual_dir: str | os.PathLike | None = None, **options) -> MultihopQA:
  """Build (or reuse) the dataset for this file and options under data_dir; returns the prepared builder.

  options: those of `qa_config` (name, filename, held_out_fraction, skip_invalid, skip_unanswerable).
  """
  builder = MultihopQA(data_dir=os.fspath(data_dir), config=qa_config(format, path, **options),
                       file_format="array_record")
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder
