"""Corrupt-input drill: damaged Hugging Face checkpoint and tokenizer files must each be refused with one line.

    python -m drills.corrupt [--keep DIR]

Builds a tiny valid Llama checkpoint offline (`transformers` save_pretrained: one model.safetensors, and a sharded
copy with model.safetensors.index.json) and a tiny tokenizer.json, damages copies of them (`CASES`: a truncated
file, header offsets past the end, a header length larger than the file, a header that is not JSON, a missing
shard, an index that misses a tensor, config.json that is not JSON or misses a field, a tokenizer.json that is not
JSON or that the tokenizers library rejects, a tokenizer_config.json that is not JSON), loads each with stepjax
(`load_hf_checkpoint`, `HFTokenizer`) and checks the refusal: a ValueError raised by stepjax code, one line, naming
the damaged file, with no library exception chained to it. Prints each line and
"corrupt drill: N/N damaged inputs rejected with one line".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from typing import Callable

# Damaged files, by case; every one of them must be refused by stepjax with one line naming it.
SINGLE, SHARDED, TOKENIZER = "single", "sharded", "tokenizer"


@dataclasses.dataclass(frozen=True)
class Case:
  """One damaged input: `damage(dir)` edits a copy of the `source` directory and returns the damaged file's path;
  `kind` says how it is loaded ("checkpoint": load_hf_checkpoint(dir), "tokenizer": HFTokenizer(dir))."""

  name: str
  source: str
  damage: Callable[[str], str]
  kind: str


def build_sources(root: str) -> dict[str, str]:
  """A tiny random Llama checkpoint (one file, and sharded with an index) and a tiny tokenizer.json, offline."""
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers

  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  paths = {name: os.path.join(root, name) for name in (SINGLE, SHARDED, TOKENIZER)}
  model.save_pretrained(paths[SINGLE], safe_serialization=True)
  model.save_pretrained(paths[SHARDED], safe_serialization=True, max_shard_size="20KB")
  os.makedirs(paths[TOKENIZER])
  vocab = {word: i for i, word in enumerate(["[UNK]", "search", "answer", "the", "of", "<|pad|>"])}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(os.path.join(paths[TOKENIZER], "tokenizer.json"))
  return paths


# --------------------------------------------------------------------------------------------------
# Damage (each edits the directory in place and returns the damaged file)
# --------------------------------------------------------------------------------------------------


def _safetensors_parts(file: str) -> tuple[dict, bytes]:
  with open(file, "rb") as f:
    data = f.read()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n]), data[8 + n:]


def _write_safetensors(file: str, header: dict, payload: bytes) -> None:
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + payload)


def truncate_weights(path: str) -> str:
  """model.safetensors cut in half (a download or copy that stopped)."""
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[:len(data) // 2])
  return file


def offsets_past_the_end(path: str) -> str:
  """The last tensor's data_offsets moved 4 KiB past the end of the data (same size, so the shape still fits)."""
  file = os.path.join(path, "model.safetensors")
  header, payload = _safetensors_parts(file)
  last = max((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"][1])
  begin, end = header[last]["data_offsets"]
  header[last]["data_offsets"] = [begin + 4096, end + 4096]
  _write_safetensors(file, header, payload)
  return file


def header_length_too_big(path: str) -> str:
  """The 8-byte header length says 1 GB, the file is a few KB."""
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", 10**9) + data[8:])
  return file


def header_not_json(path: str) -> str:
  """The header's bytes overwritten (same length) with something that is not JSON."""
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  (n,) = struct.unpack("<Q", data[:8])
  with open(file, "wb") as f:
    f.write(data[:8] + b"{'dtype': F32" + b" " * (n - 13) + data[8 + n:])
  return file


def _first_shard(path: str) -> str:
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return sorted(set(json.load(f)["weight_map"].values()))[0]


def remove_shard(path: str) -> str:
  """A shard the index names deleted (an incomplete download)."""
  file = os.path.join(path, _first_shard(path))
  os.remove(file)
  return file


def _rewrite_json(path: str, name: str, edit) -> str:
  """path/name loaded as JSON, changed in place by `edit`, written back; -> the file."""
  file = os.path.join(path, name)
  with open(file) as f:
    data = json.load(f)
  edit(data)
  with open(file, "w") as f:
    json.dump(data, f)
  return file


def _cut_in_half(path: str, name: str) -> str:
  """path/name cut off mid-way (an interrupted download); -> the file."""
  file = os.path.join(path, name)
  with open(file) as f:
    text = f.read()
  with open(file, "w") as f:
    f.write(text[:len(text) // 2])
  return file


def index_misses_a_tensor(path: str) -> str:
  """model.norm.weight dropped from the index's weight_map (an index from another export)."""
  return _rewrite_json(path, "model.safetensors.index.json", lambda index: index["weight_map"].pop("model.norm.weight"))


def index_not_json(path: str) -> str:
  """model.safetensors.index.json cut off mid-way."""
  return _cut_in_half(path, "model.safetensors.index.json")


def config_not_json(path: str) -> str:
  """config.json with a trailing comma (hand-edited)."""
  file = os.path.join(path, "config.json")
  with open(file) as f:
    text = f.read()
  with open(file, "w") as f:
    f.write(text.rstrip().rstrip("}") + ",}")
  return file


def config_missing_field(path: str) -> str:
  """config.json without hidden_size."""
  return _rewrite_json(path, "config.json", lambda config: config.pop("hidden_size"))


def tokenizer_not_json(path: str) -> str:
  """tokenizer.json cut off mid-way."""
  return _cut_in_half(path, "tokenizer.json")


def tokenizer_rejected(path: str) -> str:
  """tokenizer.json that is JSON, with a model type the tokenizers library does not know."""
  return _rewrite_json(path, "tokenizer.json", lambda tokenizer: tokenizer["model"].update(type="NoSuchModel"))


def tokenizer_config_not_json(path: str) -> str:
  """tokenizer_config.json (where the pad token is looked up) that is not JSON."""
  file = os.path.join(path, "tokenizer_config.json")
  with open(file, "w") as f:
    f.write('{"pad_token": "<|pad|>"')
  return file


CASES = (
    Case("truncated model.safetensors", SINGLE, truncate_weights, "checkpoint"),
    Case("header offsets past the end", SINGLE, offsets_past_the_end, "checkpoint"),
    Case("header length larger than the file", SINGLE, header_length_too_big, "checkpoint"),
    Case("header not JSON", SINGLE, header_not_json, "checkpoint"),
    Case("shard missing", SHARDED, remove_shard, "checkpoint"),
    Case("index misses a tensor", SHARDED, index_misses_a_tensor, "checkpoint"),
    Case("index not JSON", SHARDED, index_not_json, "checkpoint"),
    Case("config.json not JSON", SINGLE, config_not_json, "checkpoint"),
    Case("config.json missing a field", SINGLE, config_missing_field, "checkpoint"),
    Case("tokenizer.json not JSON", TOKENIZER, tokenizer_not_json, "tokenizer"),
    Case("tokenizer.json rejected by the library", TOKENIZER, tokenizer_rejected, "tokenizer"),
    Case("tokenizer_config.json not JSON", TOKENIZER, tokenizer_config_not_json, "tokenizer"),
)


def damaged_copy(case: Case, sources: dict[str, str], root: str) -> tuple[str, str]:
  """A fresh copy of the case's source directory under `root`, damaged: (directory, damaged file)."""
  path = os.path.join(root, case.name.replace(" ", "_").replace(".", "_"))
  shutil.copytree(sources[case.source], path)
  return path, case.damage(path)


def load(kind: str, path: str):
  """What a user runs on the directory: load_hf_checkpoint or HFTokenizer."""
  if kind == "checkpoint":
    from stepjax.models.hf import load_hf_checkpoint

    return load_hf_checkpoint(path)
  from stepjax.tokenizers import HFTokenizer

  return HFTokenizer(path)


def refusal(load_fn: Callable[[], object], damaged_file: str) -> tuple[bool, str]:
  """(refused with one good line, the line or what went wrong instead)."""
  try:
    load_fn()
  except Exception as error:  # noqa: BLE001 - the drill grades whatever comes out
    line = str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1].filename
    problems = []
    if not isinstance(error, ValueError):
      problems.append(f"a {type(error).__name__}, not a ValueError")
    if "\n" in line:
      problems.append("more than one line")
    if damaged_file not in line:
      problems.append("does not name the damaged file")
    if os.sep + "stepjax" + os.sep not in frame:
      problems.append(f"raised in {frame}, not by stepjax")
    if error.__context__ is not None and not error.__suppress_context__:
      problems.append(f"chains a {type(error.__context__).__name__}")
    return not problems, line if not problems else f"{'; '.join(problems)}: {type(error).__name__}: {line!r}"
  return False, "loaded without an error"


def run(root: str) -> tuple[int, list[str]]:
  sources = build_sources(os.path.join(root, "sources"))
  load(TOKENIZER, sources[TOKENIZER])  # the undamaged files load
  load("checkpoint", sources[SINGLE])
  load("checkpoint", sources[SHARDED])
  passed, lines = 0, []
  for case in CASES:
    path, file = damaged_copy(case, sources, os.path.join(root, "damaged"))
    ok, line = refusal(functools.partial(load, case.kind, path), file)
    passed += ok
    lines.append(f"  [{'ok' if ok else 'FAIL'}] {case.name}: {line}")
  return passed, lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--keep", default=None, help="write the files here and keep them (default: a temp dir)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if args.keep:
    os.makedirs(args.keep, exist_ok=False)
    passed, lines = run(args.keep)
  else:
    with tempfile.TemporaryDirectory() as root:
      passed, lines = run(root)
  print(f"corrupt drill: {passed}/{len(CASES)} damaged inputs rejected with one line")
  print("\n".join(lines))
  print(f"({time.perf_counter() - start:.1f} s)")
  return 0 if passed == len(CASES) else 1


if __name__ == "__main__":
  sys.exit(main())
