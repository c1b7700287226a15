"""Hugging Face checkpoints (safetensors only, never pickle): Llama, Qwen2 and Qwen3 causal LMs.

`load_hf_checkpoint(path)` reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) and builds each parameter straight onto its sharding with
`jax.make_array_from_callback`: every device's block is read lazily from a memory map of the file, so no
device (and no host buffer) ever holds more than one tensor of the model.

Why a memory map and not `safetensors.safe_open(..., framework="numpy")`: numpy has no bfloat16, and
`safe_open` raises on BF16 tensors (the dtype of nearly every released checkpoint). The safetensors format is
an 8-byte header length, a JSON header (dtype, shape, byte offsets per tensor) and raw little-endian bytes, so
viewing the mapped bytes as the `ml_dtypes` type reads any block of any supported dtype without copies.

HF stores linear weights as [out, in]; ours are [in, out] with heads split out (see `transformer.py`):
  q_proj.weight [H*Dh, D] -> q_proj/kernel [D, H, Dh]     o_proj.weight [D, H*Dh] -> o_proj/kernel [H, Dh, D]
  gate/up_proj.weight [F, D] -> kernel [D, F]             down_proj.weight [D, F] -> kernel [F, D]
  lm_head.weight [V, D] -> lm_head/kernel [D, V]          biases [H*Dh] -> [H, Dh]; norms and embeddings as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from stepjax import checks
from stepjax.models.transformer import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16)}
# Buffers that some exporters saved alongside the weights; recomputed here, so safe to skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json fields without a default (everything else falls back on the architecture's usual value).
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class MissingCheckpointFileError(FileNotFoundError, ValueError):
  """A file the checkpoint needs is not there: a FileNotFoundError, and a ValueError like every other bad input."""


def _check_required_fields(hf: Any, source: str) -> None:
  if not isinstance(hf, dict):
    raise ValueError(f"{source} is not a JSON object (got {type(hf).__name__})")
  missing = [name for name in _REQUIRED_FIELDS if name not in hf]
  if missing:
    raise ValueError(f"{source} is missing required field{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(missing)} (a Llama / Qwen config.json has {', '.join(_REQUIRED_FIELDS)})")


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------


def _architecture(hf: dict) -> str:
  archs = hf.get("architectures") or []
  if not archs:  # fall back on model_type
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    archs = [by_type.get(hf.get("model_type"), f"<model_type {hf.get('model_type')!r}>")]
  arch = archs[0]
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"architecture: {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  return arch


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  """Old style (`rope_theta`, `rope_scaling`) and transformers-5 style (`rope_parameters`) configs."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = hf.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError("partial_rotary_factor: only full rotary embeddings (1.0) are supported")
  kind = scaling.get("rope_type") or scaling.get("type") or "default"
  if kind == "default":
    return float(theta), None
  if kind == "llama3":
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [name for name in needed if name not in scaling]
    if missing:
      raise ValueError(f"rope_scaling: rope_type llama3 needs {', '.join(needed)}; missing {', '.join(missing)}")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; supported: default, llama3")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A Hugging Face config.json dict -> ModelConfig (validated). Raises one-line ValueErrors for what we can't run."""
  _check_required_fields(hf, "config.json")
  arch = _architecture(hf)
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act: only silu (SwiGLU) is supported, got {hf['hidden_act']!r}")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias: MLP biases are not supported")
  if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
    raise ValueError(f"attention_bias: {arch} with attention_bias=True (o_proj bias) is not supported")
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
    raise ValueError("use_sliding_window: sliding-window attention is not supported")
  theta, scaling = _rope_from_hf(hf)
  num_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads, rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      initializer_range=float(hf.get("initializer_range", 0.02)))
  return ModelConfig(**fields).replace(**overrides).validate()


def _default_architecture(config: ModelConfig) -> str:
  if config.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"


def config_to_hf(config: ModelConfig, architecture: str | None = None, dtype: Any = None) -> dict:
  """ModelConfig -> a config.json dict that transformers 4.x and 5.x load."""
  arch = architecture or _default_architecture(config)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"architecture: {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  needs = {"LlamaForCausalLM": (False, False), "Qwen2ForCausalLM": (True, False), "Qwen3ForCausalLM": (False, True)}
  if (config.qkv_bias, config.qk_norm) != needs[arch]:
    raise ValueError(f"architecture: {arch} needs qkv_bias={needs[arch][0]} and qk_norm={needs[arch][1]}, "
                     f"the config has qkv_bias={config.qkv_bias} and qk_norm={config.qk_norm}")
  rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
  rope_scaling = None
  if config.rope_scaling is not None:
    rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    rope_parameters.update(rope_scaling)
  hf = {
      "architectures": [arch], "model_type": _MODEL_TYPES[arch], "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
      "tie_word_embeddings": config.tie_word_embeddings, "initializer_range": config.initializer_range,
      "attention_dropout": 0.0, "use_cache": True,
      "torch_dtype": jnp.dtype(dtype or config.param_dtype).name,
  }
  if arch == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    if arch == "Qwen3ForCausalLM":
      hf.update(attention_bias=False)
  return hf


# --------------------------------------------------------------------------------------------------
# The name / layout map
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one HF tensor becomes one of our arrays: reshape `hf_shape` to `split`, then transpose by `perm`.

  `groups[j]` lists the split axes that make up HF axis j (row-major), e.g. q_proj: hf [H*Dh, D], split
  [H, Dh, D], groups ((0, 1), (2,)), perm (2, 0, 1) -> [D, H, Dh].
  """

  hf_shape: tuple[int, ...]
  split: tuple[int, ...]
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.split[p] for p in self.perm)


def _linear(out_features: int, in_features: int) -> _Layout:  # [out, in] -> [in, out]
  return _Layout((out_features, in_features), (out_features, in_features), ((0,), (1,)), (1, 0))


def _vector(n: int) -> _Layout:
  return _Layout((n,), (n,), ((0,),), (0,))


def _matrix(rows: int, cols: int) -> _Layout:  # stored as is
  return _Layout((rows, cols), (rows, cols), ((0,), (1,)), (0, 1))


def _layer_layouts(c: ModelConfig) -> dict[tuple[str, ...], tuple[str, _Layout]]:
  """Param path inside one layer -> (HF name suffix after `model.layers.{i}.`, layout)."""
  d, h, k, dh, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  heads_in = lambda n: _Layout((n * dh, d), (n, dh, d), ((0, 1), (2,)), (2, 0, 1))  # [n*Dh, D] -> [D, n, Dh]
  out = {
      ("attn_norm", "scale"): ("input_layernorm.weight", _vector(d)),
      ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", heads_in(h)),
      ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", heads_in(k)),
      ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", heads_in(k)),
      ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", _Layout((d, h * dh), (d, h, dh), ((0,), (1, 2)),
                                                                        (1, 2, 0))),
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _vector(d)),
      ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", _linear(f, d)),
      ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", _linear(f, d)),
      ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", _linear(d, f)),
  }
  if c.qkv_bias:
    for name, n in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
      out[("attn", name, "bias")] = (f"self_attn.{name}.bias", _Layout((n * dh,), (n, dh), ((0, 1),), (0, 1)))
  if c.qk_norm:
    out[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", _vector(dh))
    out[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", _vector(dh))
  return out


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One param array: its HF source tensors (one per layer when stacked under the scan layout) and layout."""

  hf_names: tuple[str, ...]
  layout: _Layout
  stacked: bool

  @property
  def shape(self) -> tuple[int, ...]:
    return ((len(self.hf_names),) if self.stacked else ()) + self.layout.shape


def _leaves(c: ModelConfig) -> dict[tuple[str, ...], _Leaf]:
  """Our param path -> _Leaf, for the config's layout (plain stack or scan)."""
  out = {
      ("embed", "embedding"): _Leaf(("model.embed_tokens.weight",), _matrix(c.vocab_size, c.hidden_size), False),
      ("final_norm", "scale"): _Leaf(("model.norm.weight",), _vector(c.hidden_size), False),
  }
  if not c.tie_word_embeddings:
    out[("lm_head", "kernel")] = _Leaf(("lm_head.weight",), _linear(c.vocab_size, c.hidden_size), False)
  for path, (suffix, layout) in _layer_layouts(c).items():
    names = tuple(f"model.layers.{i}.{suffix}" for i in range(c.num_layers))
    if c.scan_layers:
      out[("layers",) + path] = _Leaf(names, layout, True)
    else:
      for i, name in enumerate(names):
        out[(f"layers_{i}",) + path] = _Leaf((name,), layout, False)
  return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
  """A nested mapping (dict, FrozenDict) -> {path tuple: leaf}."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


# --------------------------------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset of the data in `file`


def _read_header(file: str) -> dict[str, _TensorInfo]:
  """Every tensor's dtype, shape and location in one safetensors file, checked against the file's size before any
  data is read: a truncated or corrupt file is one ValueError line naming it, never a short read later."""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    if size < 8:
      raise ValueError(f"{file} is truncated: {size} bytes, too short for the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
      raise ValueError(f"{file} is corrupt or truncated: its safetensors header length is {header_len} bytes, but "
                       f"only {size - 8} bytes follow the length field")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{file} is corrupt: its safetensors header is not valid JSON ({checks.json_problem(error)})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{file} is corrupt: its safetensors header is not a JSON object")
  available = size - 8 - header_len  # bytes of tensor data the file holds
  out, ranges = {}, []
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _is_int_list(entry.get("shape"))
            and _is_int_list(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
      raise ValueError(f"{file} is corrupt: header entry {name!r} needs a dtype string, a shape and two "
                       "data_offsets (non-negative ints)")
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{name}: dtype {entry['dtype']} in {file} is not supported; supported: "
                       f"{', '.join(_SAFETENSORS_DTYPES)}")
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise ValueError(f"{file} is corrupt: tensor {name} has data_offsets [{begin}, {end}) ({end - begin} bytes), "
                       f"but shape {list(shape)} in {entry['dtype']} takes {math.prod(shape) * dtype.itemsize}")
    ranges.append((begin, end, name))
    out[name] = _TensorInfo(file, dtype, shape, 8 + header_len + begin)
  _check_data_ranges(file, sorted(ranges), available)
  return out


def _is_int_list(x) -> bool:
  return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)


def _check_data_ranges(file: str, ranges: list[tuple[int, int, str]], available: int) -> None:
  """The tensors' byte ranges (sorted) tile [0, total) with no gap or overlap, as the format requires, and the file
  holds all `total` bytes: a file cut short is "truncated", offsets past the end of an otherwise intact file
  "corrupt"."""
  position, broken = 0, None
  for begin, end, name in ranges:
    if begin != position and broken is None:
      broken = (begin, end, name, "overlap the previous tensor" if begin < position else
                f"leave a gap after byte {position}")
    position = max(position, end)
  if broken is None and position > available:
    first_short = next(name for _, end, name in ranges if end > available)
    raise ValueError(f"{file} is truncated: its header describes {position} bytes of tensor data, the file holds "
                     f"{available} (tensor {first_short} is cut short or missing)")
  for begin, end, name in ranges:
    if end > available:
      raise ValueError(f"{file} is corrupt: tensor {name}'s data_offsets [{begin}, {end}) run past the end of the "
                       f"file's {available} bytes of tensor data")
  if broken is not None:
    begin, end, name, what = broken
    raise ValueError(f"{file} is corrupt: tensor {name}'s data_offsets [{begin}, {end}) {what} (safetensors data "
                     "is contiguous)")


class _Reader:
  """Lazy reads of whole tensors or row blocks through one read-only memory map per file."""

  def __init__(self, tensors: dict[str, _TensorInfo]):
    self.tensors = tensors
    self._maps: dict[str, np.memmap] = {}

  def view(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    if info.file not in self._maps:
      self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
    nbytes = math.prod(info.shape) * info.dtype.itemsize
    return self._maps[info.file][info.start:info.start + nbytes].view(info.dtype).reshape(info.shape)


def _checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of a checkpoint directory, and the index's weight_map (tensor -> file; None without an
  index). Missing files are `MissingCheckpointFileError`s, a corrupt index a one-line ValueError."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = checks.read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f"{index} is corrupt: it needs a \"weight_map\" object (tensor name -> shard file name)")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(path, name)):
        raise MissingCheckpointFileError(f"{os.path.join(path, name)}: listed in model.safetensors.index.json but "
                                         "missing")
    return [os.path.join(path, name) for name in files], weight_map
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single], None
  raise MissingCheckpointFileError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                   "checkpoints are read, never pickle .bin files)")


def _read_block(reader: _Reader, leaf: _Leaf, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
  """The block `index` (slices over our array's axes) of one param, reading only the HF rows it needs."""
  dims = leaf.shape
  index = tuple(slice(*s.indices(n)) for s, n in zip(index, dims))
  if leaf.stacked:
    layers, index = range(*index[0].indices(dims[0])), index[1:]
    return np.stack([_read_layer_block(reader, leaf.hf_names[i], leaf.layout, index, dtype) for i in layers])
  return _read_layer_block(reader, leaf.hf_names[0], leaf.layout, index, dtype)


def _read_layer_block(reader: _Reader, name: str, layout: _Layout, index: tuple[slice, ...],
                      dtype: np.dtype) -> np.ndarray:
  split_slices = [slice(None)] * len(layout.split)
  for axis, s in zip(layout.perm, index):
    split_slices[axis] = s
  # For each HF axis: a contiguous range from its leading split axis; inner split axes are cut after reshape.
  hf_slices, block_split, inner_cuts = [], [], []
  for group in layout.groups:
    lead = split_slices[group[0]]
    inner = math.prod(layout.split[a] for a in group[1:])
    hf_slices.append(slice(lead.start * inner, lead.stop * inner))
    block_split.append(lead.stop - lead.start)
    inner_cuts.append(slice(None))
    for a in group[1:]:
      block_split.append(layout.split[a])
      inner_cuts.append(split_slices[a])
  block = np.asarray(reader.view(name)[tuple(hf_slices)]).reshape(block_split)[tuple(inner_cuts)]
  return np.ascontiguousarray(block.transpose(layout.perm)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def _stored_tensors(path: str) -> dict[str, _TensorInfo]:
  """Name -> dtype, shape and location of every tensor of a safetensors checkpoint (headers only, each checked
  against its file's size; with an index, its weight_map must agree with the shards' headers)."""
  files, weight_map = _checkpoint_files(path)
  tensors: dict[str, _TensorInfo] = {}
  for file in files:
    for name, info in _read_header(file).items():
      if name in tensors:
        raise ValueError(f"{name}: stored twice, in {tensors[name].file} and {file}")
      tensors[name] = info
  if weight_map is not None:
    index = os.path.join(path, "model.safetensors.index.json")
    for name, file in weight_map.items():
      if name not in tensors or tensors[name].file != os.path.join(path, file):
        raise ValueError(f"{index} does not match its shards: its weight_map puts {name} in {file}, whose header "
                         "does not have it")
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
      raise ValueError(f"{index} does not match its shards: its weight_map does not list {unlisted[0]} (stored in "
                       f"{os.path.basename(tensors[unlisted[0]].file)}; {len(unlisted)} unlisted in all)")
  return tensors


def _tie_if_no_head(config: ModelConfig, tensors) -> ModelConfig:
  """A checkpoint that stores no LM head uses its embedding as the head, whatever config.json says."""
  if "lm_head.weight" not in tensors and not config.tie_word_embeddings:
    return config.replace(tie_word_embeddings=True)
  return config


def _read_config(path: str, **overrides) -> ModelConfig:
  """The ModelConfig of the directory's config.json alone."""
  if not os.path.isdir(path):
    raise MissingCheckpointFileError(f"{path}: checkpoint directory does not exist")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise MissingCheckpointFileError(f"{config_file}: missing (a Hugging Face checkpoint needs config.json)")
  hf = checks.read_json(config_file)
  _check_required_fields(hf, config_file)
  return config_from_hf(hf, **overrides)


def load_hf_config(path: str, **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint directory, as `load_hf_checkpoint` builds it (to build shardings before
  loading): config.json, plus tied embeddings when the weights store no LM head (read from the safetensors headers,
  when the directory has weights)."""
  config = _read_config(path, **overrides)
  has_weights = any(os.path.isfile(os.path.join(path, name))
                    for name in ("model.safetensors", "model.safetensors.index.json"))
  return _tie_if_no_head(config, _stored_tensors(path)) if has_weights else config


def load_hf_checkpoint(path: str, *, dtype: Any = jnp.float32, shardings: Any = None,
                       config_overrides: dict | None = None) -> tuple[ModelConfig, dict]:
  """Loads a LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM safetensors checkpoint.

  dtype: storage dtype of the returned params (becomes `param_dtype`; also the compute `dtype` unless overridden).
  shardings: None (default device), a pytree of `jax.sharding.Sharding` matching the params, or a callable
    config -> such a pytree (handy: the tree depends on the final config, e.g. tied embeddings, scan layout).
  config_overrides: ModelConfig fields to set, e.g. {"scan_layers": True, "remat": True, "dtype": "bfloat16"}.
  Every check (architecture, missing / extra / mis-shaped tensors, shardings tree) runs before any data is read.
  Returns (config, params).
  """
  overrides = {"param_dtype": jnp.dtype(dtype).name, "dtype": jnp.dtype(dtype).name, **(config_overrides or {})}
  config = _read_config(path, **overrides)
  tensors = _stored_tensors(path)
  config = _tie_if_no_head(config, tensors)
  leaves = _leaves(config)

  expected = {}
  for leaf in leaves.values():
    for name in leaf.hf_names:
      expected[name] = leaf.layout.hf_shape
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f"{name}: missing from the checkpoint in {path}")
    if tensors[name].shape != shape:
      raise ValueError(f"{name}: shape mismatch with config.json: expected {shape}, got {tensors[name].shape}")
  tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()  # some exporters save a tied copy
  extra = sorted(n for n in tensors if n not in expected and n not in tolerated and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise ValueError(f"{extra[0]}: unexpected tensor in the checkpoint ({len(extra)} unexpected in all: "
                     f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")

  if callable(shardings):
    shardings = shardings(config)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_shardings = {path_: device for path_ in leaves}
  else:
    flat_shardings = _flatten(shardings)
    if set(flat_shardings) != set(leaves):
      missing = sorted(set(leaves) - set(flat_shardings)) or sorted(set(flat_shardings) - set(leaves))
      raise ValueError(f"shardings: tree does not match the params of this config (first differing path: "
                       f"{'/'.join(missing[0])})")

  reader = _Reader(tensors)
  np_dtype = jnp.dtype(dtype)
  params = {}
  for path_, leaf in leaves.items():
    blocks: dict[tuple, np.ndarray] = {}  # replicated shardings ask for the same block once per device

    def callback(index, leaf=leaf, blocks=blocks):
      key = tuple((s.start, s.stop) for s in index)
      if key not in blocks:
        blocks[key] = _read_block(reader, leaf, index, np_dtype)
      return blocks[key]

    params[path_] = jax.make_array_from_callback(leaf.shape, flat_shardings[path_], callback)
  return config, _nest(params)


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def _to_hf(array: np.ndarray, layout: _Layout) -> np.ndarray:
  """Inverse of the load layout: our array -> the HF tensor."""
  return np.ascontiguousarray(np.transpose(array, np.argsort(layout.perm))).reshape(layout.hf_shape)


def save_hf_checkpoint(config: ModelConfig, params: dict, path: str, *, architecture: str | None = None,
                       dtype: Any = None, extra_config: dict | None = None) -> None:
  """Writes config.json and model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  params: Transformer params, plain-stack or scan layout (PolicyWithValue params too: the value head is dropped).
  architecture: LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM; default from the config (qk_norm -> Qwen3,
    qkv_bias -> Qwen2, else Llama). dtype: of the stored tensors (default param_dtype).
  extra_config: more config.json keys (e.g. bos_token_id, eos_token_id).
  Params are gathered to this host and written one at a time (single-process use; on multi-host, gather first).
  """
  dtype = jnp.dtype(dtype or config.param_dtype)
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  if dtype not in names:
    raise ValueError(f"dtype: {dtype.name} cannot be saved; supported: float64, float32, float16, bfloat16")
  hf_config = config_to_hf(config, architecture, dtype)
  hf_config.update(extra_config or {})
  layout_config = config.replace(scan_layers="layers" in params)
  leaves = _leaves(layout_config)
  flat = {path_: v for path_, v in _flatten(params).items() if path_[0] != "value_head"}
  missing = sorted(set(leaves) - set(flat))
  if missing:
    raise ValueError(f"params: missing {'/'.join(missing[0])} for this config")
  for path_, leaf in leaves.items():
    if tuple(flat[path_].shape) != leaf.shape:
      raise ValueError(f"params: {'/'.join(path_)} has shape {tuple(flat[path_].shape)}, the config needs {leaf.shape}")

  # Header first (offsets follow from shapes), then the tensors one at a time.
  entries, offset = [], 0
  for path_, leaf in leaves.items():
    for i, name in enumerate(leaf.hf_names):
      nbytes = math.prod(leaf.layout.hf_shape) * dtype.itemsize
      entries.append((name, path_, i if leaf.stacked else None, leaf.layout, offset, offset + nbytes))
      offset += nbytes
  header = {name: {"dtype": names[dtype], "shape": list(layout.hf_shape), "data_offsets": [begin, end]}
            for name, _, _, layout, begin, end in entries}
  header["__metadata__"] = {"format": "pt"}
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    host_path, host = None, None
    for _, path_, layer, layout, _, _ in entries:
      if path_ != host_path:  # one param (all its layers when stacked) on the host at a time
        host_path, host = path_, np.asarray(jax.device_get(flat[path_])).astype(dtype)
      f.write(_to_hf(host if layer is None else host[layer], layout).tobytes())
