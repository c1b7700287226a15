"""Datasets as TFDS builders, read by random access without TensorFlow.

  multihop_qa    HotpotQA / 2WikiMultihopQA / MuSiQue files -> one common record dict (strict parsing)
  qa_builder     `MultihopQA`: those records as array_record, train / held_out split by a hash of the id
  episodes       `EpisodeSet`: expert EpisodeBatch rows for SFT, read back as padded EpisodeBatches
  reading        seeded shuffles, per-process shards, epochs and batches over any random-access source

Importing this package imports tensorflow_datasets (about a second on first import).
"""

from stepjax.data.episodes import EpisodeSet, episode_rows, pad_episodes, read_episodes, write_episodes
from stepjax.data.multihop_qa import FORMATS, LoadReport, decode_record, load_records
from stepjax.data.qa_builder import MultihopQA, held_out, prepare_qa, qa_config
from stepjax.data.reading import batches, epoch_indices, shard, shuffled_order

__all__ = ["FORMATS", "EpisodeSet", "LoadReport", "MultihopQA", "batches", "decode_record", "episode_rows",
           "epoch_indices", "held_out", "load_records", "pad_episodes", "prepare_qa", "qa_config", "read_episodes",
           "shard", "shuffled_order", "write_episodes"]
