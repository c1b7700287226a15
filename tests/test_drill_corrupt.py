"""Corrupt inputs: every damaged checkpoint or tokenizer file is one ValueError line from stepjax naming the file and
what is wrong (never a json / tokenizers traceback, never partial weights), directly and through runner.build.

The tiny checkpoint (transformers save_pretrained, one file and sharded) and tokenizer.json, and the damage done to
copies of them, are the corrupt drill's (`drills/corrupt.py`); the exact messages are asserted here.
"""

import os
import re
import traceback

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from drills import corrupt
from experiments import runner
from experiments.configs import steppo
from stepjax.models.hf import MissingCheckpointFileError, load_hf_checkpoint, load_hf_config
from stepjax.tokenizers import HFTokenizer, load_tokenizer

CASES = {case.name: case for case in corrupt.CASES}
F = "{file}"  # stands for the damaged file's path (escaped) in the patterns below
REQUIRED = "vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads"
# case -> the whole message, as a regex with F for the damaged file.
MESSAGES = {
    "truncated model.safetensors": F + r" is truncated: its header describes 90752 bytes of tensor data, the file "
                                       r"holds 44328 \(tensor model\.layers\.0\.self_attn\.o_proj\.weight is cut short "
                                       r"or missing\)",
    "header offsets past the end": F + r" is corrupt: tensor model\.norm\.weight's data_offsets \[94720, 94848\) run "
                                       r"past the end of the file's 90752 bytes of tensor data",
    "header length larger than the file": F + r" is corrupt or truncated: its safetensors header length is "
                                              r"1000000000 bytes, but only 92840 bytes follow the length field",
    "header not JSON": F + r" is corrupt: its safetensors header is not valid JSON \(line 1 column 2: Expecting "
                           r"property name enclosed in double quotes\)",
    "shard missing": F + r": listed in model\.safetensors\.index\.json but missing",
    "index misses a tensor": F + r" does not match its shards: its weight_map does not list model\.norm\.weight "
                                 r"\(stored in model-00006-of-00006\.safetensors; 1 unlisted in all\)",
    "index not JSON": F + r" is not valid JSON \(line \d+ column \d+: Expecting property name enclosed in double "
                          r"quotes\)",
    "config.json not JSON": F + r" is not valid JSON \(line \d+ column 2: Expecting property name enclosed in double "
                                r"quotes\)",
    "config.json missing a field": F + rf" is missing required field hidden_size \(a Llama / Qwen config\.json has "
                                       rf"{REQUIRED}\)",
    "tokenizer.json not JSON": F + r" is not valid JSON \(line \d+ column \d+: Expecting value\)",
    "tokenizer.json rejected by the library": F + r" is not a tokenizer\.json the tokenizers library can load \(data "
                                                  r"did not match any variant of untagged enum ModelUntagged at line 1 "
                                                  r"column \d+\)",
    "tokenizer_config.json not JSON": F + r" is not valid JSON \(line 1 column 24: Expecting ',' delimiter\)",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  return corrupt.build_sources(str(tmp_path_factory.mktemp("corrupt_sources")))


@pytest.fixture(scope="module")
def damaged(sources, tmp_path_factory):
  """case name -> (damaged directory, damaged file)."""
  root = str(tmp_path_factory.mktemp("corrupt_damaged"))
  return {name: corrupt.damaged_copy(case, sources, root) for name, case in CASES.items()}


def _pattern(name: str, file: str) -> str:
  return "^" + MESSAGES[name].replace(F, re.escape(file)) + "$"


def _assert_one_stepjax_line(error: BaseException) -> None:
  assert isinstance(error, ValueError) and "\n" not in str(error)
  raised_in = traceback.extract_tb(error.__traceback__)[-1].filename  # stepjax's code or its runner, not a library's
  assert f"{os.sep}stepjax{os.sep}" in raised_in or raised_in.endswith(os.path.join("experiments", "runner.py"))
  assert error.__context__ is None or error.__suppress_context__  # no json / tokenizers exception shown with it


def test_the_undamaged_files_load(sources):
  config, params = load_hf_checkpoint(sources[corrupt.SINGLE])
  sharded_config, sharded = load_hf_checkpoint(sources[corrupt.SHARDED])
  assert config == sharded_config and config.hidden_size == 32 and config.num_layers == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):  # the same weights, stored two ways
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert HFTokenizer(sources[corrupt.TOKENIZER]).encode("search the answer") == [1, 3, 2]
  assert set(MESSAGES) == set(CASES)


@pytest.mark.parametrize("name", list(MESSAGES))
def test_damaged_input_is_one_line_naming_the_file(name, damaged):
  path, file = damaged[name]
  load = load_hf_checkpoint if CASES[name].kind == "checkpoint" else HFTokenizer
  with pytest.raises(ValueError, match=_pattern(name, file)) as info:
    load(path)
  _assert_one_stepjax_line(info.value)
  if CASES[name].kind == "checkpoint" and name != "config.json not JSON" and name != "config.json missing a field":
    with pytest.raises(ValueError, match=_pattern(name, file)):
      load_hf_config(path)  # the config alone reads the headers too
  assert corrupt.refusal(lambda: load(path), file) == (True, info.value.args[0])


def test_missing_files_are_value_errors_too(damaged):
  _, file = damaged["shard missing"]
  with pytest.raises(MissingCheckpointFileError) as info:
    load_hf_checkpoint(os.path.dirname(file))
  assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
  with pytest.raises(ValueError, match=r"^.*/nowhere: checkpoint directory does not exist$"):
    load_hf_checkpoint(os.path.join(os.path.dirname(file), "nowhere"))


def test_load_tokenizer_reports_the_same_line(damaged):
  _, file = damaged["tokenizer.json not JSON"]
  with pytest.raises(ValueError, match=_pattern("tokenizer.json not JSON", file)):
    load_tokenizer(file)


@pytest.mark.parametrize("name", ["truncated model.safetensors", "shard missing", "index misses a tensor",
                                  "config.json missing a field", "tokenizer.json not JSON",
                                  "tokenizer.json rejected by the library"])
def test_runner_build_reports_one_line(name, damaged):
  """experiments/train.py's entry: runner.build with model.checkpoint=DIR (or tokenizer=FILE)."""
  path, file = damaged[name]
  config = steppo.get_config()
  if CASES[name].kind == "checkpoint":
    config.model.checkpoint = path
    pattern = "^model\\.checkpoint: " + _pattern(name, file)[1:]  # the runner names the config field first
  else:
    config.tokenizer = file
    pattern = "^tokenizer: " + _pattern(name, file)[1:]  # checks.section("tokenizer") keeps the line whole
  with pytest.raises(ValueError, match=pattern) as info:
    runner.build(config)
  _assert_one_stepjax_line(info.value)
