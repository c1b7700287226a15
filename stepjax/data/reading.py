"""Reading a random-access record source: seeded shuffles, per-process shards, epochs and batches of records.

A source is anything with `len` and `source[i]` (a `tfds` `ArrayRecordDataSource`, a list). Nothing here streams a
file: every epoch is an order over record indices, computed up front, so any process can compute any other's share.

  - Shuffling sorts the indices by a keyed integer hash (splitmix64 of index + a salt from seed and epoch), not by a
    numpy Generator, whose streams numpy does not promise to keep across versions: the same (seed, epoch) gives
    the same order on any machine and any numpy; other seeds or epochs give other orders.
  - Sharding happens after shuffling, process p taking positions p, p + P, p + 2P, ... of the epoch order: the
    shards are disjoint and together cover the epoch. With `equal_shards=True` the last `n mod P` positions are left
    out so every process gets the same number of records (multi-host steps stay in lockstep); those records are
    then missing from that epoch only, since each epoch has its own order.
  - A batch is a list of `batch_size` decoded records; batches do not straddle epochs.

    for batch in batches(source, 32, seed=0, num_epochs=2):     # process index / count from jax by default
      ...
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from stepjax.checks import check_bool, check_int, fail

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on a uint64 array (a bijection, so distinct inputs never tie)."""
  x = x + _GOLDEN
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def shuffled_order(num_records: int, seed: int, epoch: int = 0) -> np.ndarray:
  """A permutation of range(num_records) (int64) that depends only on (num_records, seed, epoch)."""
  check_int(num_records, "num_records", 0)
  check_int(seed, "seed")
  check_int(epoch, "epoch", 0)
  salt = _mix(np.array([seed % 2**64], np.uint64))
  salt = _mix(salt ^ np.array([epoch], np.uint64))
  keys = _mix(np.arange(num_records, dtype=np.uint64) ^ salt)
  return np.argsort(keys, kind="stable").astype(np.int64)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  count = jax.process_count() if process_count is None else check_int(process_count, "process_count", 1)
  index = jax.process_index() if process_index is None else check_int(process_index, "process_index", 0)
  if index >= count:
    fail("process_index", f"must be < process_count {count}, got {index}")
  return index, count


def shard(indices: Sequence[int] | np.ndarray, process_index: int | None = None, process_count: int | None = None,
          *, equal_shards: bool = False) -> np.ndarray:
  """This process's share of `indices`: every process_count-th entry, starting at process_index.

  Defaults: `jax.process_index()` and `jax.process_count()`. equal_shards=True first drops the last
  len(indices) mod process_count entries, so all shards have the same length.
  """
  index, count = _process(process_index, process_count)
  indices = np.asarray(indices, np.int64)
  if check_bool(equal_shards, "equal_shards"):
    indices = indices[:len(indices) - len(indices) % count]
  return indices[index::count]


def epoch_indices(num_records: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  equal_shards: bool = False) -> np.ndarray:
  """The record indices this process reads in `epoch`, in reading order (file order when shuffle=False)."""
  check_int(num_records, "num_records", 0)
  order = shuffled_order(num_records, seed, epoch) if check_bool(shuffle, "shuffle") else np.arange(num_records)
  return shard(order, process_index, process_count, equal_shards=equal_shards)


def read_records(source: Any, indices: Sequence[int] | np.ndarray) -> list:
  """source[i] for each index, in one batched read where the source offers one (`__getitems__`)."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def batches(source: Any, batch_size: int, *, seed: int = 0, num_epochs: int | None = 1, shuffle: bool = True,
            drop_remainder: bool = False, process_index: int | None = None, process_count: int | None = None,
            equal_shards: bool = False, decode: Callable[[Any], Any] | None = None) -> Iterator[list]:
  """Lists of `batch_size` records from this process's shard, epoch after epoch (num_epochs None: forever).

  Epoch e is shuffled with (seed, e). drop_remainder=True drops each epoch's last, short batch. `decode` maps
  every record read (e.g. `multihop_qa.decode_record`).
  """
  check_int(batch_size, "batch_size", 1)
  check_int(num_epochs, "num_epochs", 0, optional=True)
  check_bool(drop_remainder, "drop_remainder")
  num_records = len(source)
  epoch = 0
  while num_epochs is None or epoch < num_epochs:
    order = epoch_indices(num_records, seed=seed, epoch=epoch, shuffle=shuffle, process_index=process_index,
                          process_count=process_count, equal_shards=equal_shards)
    if num_epochs is None and len(order) < (batch_size if drop_remainder else 1):
      fail("batch_size", f"{batch_size} records per batch but this shard has {len(order)} per epoch; "
                         "reading forever would never yield")
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      if drop_remainder and len(chunk) < batch_size:
        break
      records = read_records(source, chunk)
      yield [decode(r) for r in records] if decode is not None else records
    epoch += 1
