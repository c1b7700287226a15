"""Hugging Face checkpoints: logits parity with transformers, round trips, sharded loads, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepjax.models import forward, param_logical_axes, unstack_layer_params
from stepjax.models.hf import load_hf_checkpoint, load_hf_config, save_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # small, so the scaled bands matter at short lengths
# name -> (config class, config kwargs, save_pretrained kwargs, torch dtype of the saved weights)
CASES = {
    "llama_untied_llama3_rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE), {},
                                 "float32"),
    "qwen2_tied_sharded_index": ("Qwen2Config", dict(tie_word_embeddings=True), dict(max_shard_size="100KB"),
                                 "float32"),
    "qwen3_untied_bf16": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32), {}, "bfloat16"),
    "qwen3_tied": ("Qwen3Config", dict(tie_word_embeddings=True), {}, "float32"),
}
SEQ_LENS = [10, 6, 3]  # right-padded rows


def randomize(model, seed: int):
  """Random weights everywhere (HF inits norms to 1 and biases to 0, which would hide mapping mistakes)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  mask = (np.arange(tokens.shape[1]) < np.array(SEQ_LENS)[:, None]).astype(np.int64)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  return out.float().numpy()


def assert_valid_close(ours, theirs, atol):
  for b, n in enumerate(SEQ_LENS):
    np.testing.assert_allclose(np.asarray(ours)[b, :n], theirs[b, :n], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tokens():
  tokens = np.random.default_rng(0).integers(1, 128, (3, max(SEQ_LENS))).astype(np.int32)
  tokens[np.arange(tokens.shape[1]) >= np.array(SEQ_LENS)[:, None]] = 0
  return tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, a float32 transformers model with exactly the saved weights)."""
  out = {}
  for i, (name, (config_class, kwargs, save_kwargs, dtype)) in enumerate(CASES.items()):
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model, i)
    model = model.to(getattr(torch, dtype))
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    # Reference: transformers' own float32 load of the files (casting the bf16 model back with .float() would
    # keep its RoPE inverse frequencies rounded to bf16).
    out[name] = (path, transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval())
  return out


jit_forward = jax.jit(forward, static_argnums=0)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_and_round_trip(name, checkpoints, tokens, tmp_path):
  path, model = checkpoints[name]
  config, params = load_hf_checkpoint(path)
  assert config.tie_word_embeddings == CASES[name][1]["tie_word_embeddings"]
  assert ("lm_head" in params) != config.tie_word_embeddings
  reference = hf_logits(model, tokens)
  assert_valid_close(jit_forward(config, params, jnp.asarray(tokens))[0], reference, atol=1e-4)

  # stepjax -> safetensors -> transformers: the same model.
  save_hf_checkpoint(config, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  assert type(reloaded).__name__ == type(model).__name__
  assert_valid_close(hf_logits(reloaded, tokens), reference, atol=1e-5)
  _, params_again = load_hf_checkpoint(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sharded_index_and_bf16_files_are_what_the_cases_claim(checkpoints):
  qwen2_path = checkpoints["qwen2_tied_sharded_index"][0]
  with open(os.path.join(qwen2_path, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  from safetensors import safe_open
  bf16_file = os.path.join(checkpoints["qwen3_untied_bf16"][0], "model.safetensors")
  with safe_open(bf16_file, framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"


def test_scan_layout_and_bf16_save(checkpoints, tmp_path):
  path, model = checkpoints["qwen3_untied_bf16"]
  config, params = load_hf_checkpoint(path)
  scan_config, scanned = load_hf_checkpoint(path, dtype=jnp.bfloat16, config_overrides={"scan_layers": True})
  assert scan_config.scan_layers and scan_config.param_dtype == "bfloat16"
  assert scanned["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 32)
  # bf16 -> bf16 is exact; f32 params hold the same bf16 values.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b),
               unstack_layer_params(scanned), params)

  # Saving from the scan layout, in bfloat16: transformers reads the same weights back.
  save_hf_checkpoint(scan_config, scanned, str(tmp_path), dtype=jnp.bfloat16)
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  expected = dict(model.named_parameters())
  for name, p in reloaded.named_parameters():
    assert p.dtype == torch.bfloat16, name
    np.testing.assert_array_equal(p.float().detach().numpy(), expected[name].detach().numpy(), err_msg=name)


def _mesh_spec(logical, mesh_axes: dict) -> jax.sharding.PartitionSpec:
  """Logical names -> mesh axes, each mesh axis used at most once per array."""
  used, out = set(), []
  for name in logical:
    axis = mesh_axes.get(name)
    out.append(None if axis in used else axis)
    used.add(axis)
  return jax.sharding.PartitionSpec(*out)


@pytest.mark.usefixtures("eight_devices")  # tests/conftest.py
@pytest.mark.parametrize("scan_layers", [False, True], ids=["plain", "scan"])
def test_sharded_load_places_each_block(checkpoints, scan_layers, tmp_path):
  """Each device's block is read straight from the file: leading-axis cuts (heads, layers), inner cuts (head_dim
  inside HF's fused heads*head_dim rows), transposed axes (embed is HF's input axis), replicated norms."""
  path, _ = checkpoints["qwen2_tied_sharded_index"]
  _, reference = load_hf_checkpoint(path)
  mesh = jax.make_mesh((2, 4), ("x", "y"))
  mesh_axes = {"vocab": "y", "embed": "x", "heads": "y", "head_dim": "y", "mlp": "y", "layers": "x"}

  def shardings(config):
    specs = param_logical_axes(config)
    return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, _mesh_spec(spec, mesh_axes)), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

  config, params = load_hf_checkpoint(path, shardings=shardings, config_overrides={"scan_layers": scan_layers})
  expected_shardings = shardings(config)
  jax.tree.map(lambda arr, sharding: (arr.sharding.is_equivalent_to(sharding, arr.ndim) or
                                      pytest.fail(f"{arr.sharding} != {sharding}")), params, expected_shardings)
  k_bias = params["layers"]["attn"]["k_proj"]["bias"] if scan_layers else params["layers_0"]["attn"]["k_proj"]["bias"]
  assert k_bias.sharding.spec[-1] == "y" and len(k_bias.addressable_shards) == 8
  if scan_layers:
    assert params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[0] == "x"
  # Saving gathers sharded params (explicit-axis arrays included) one at a time.
  save_hf_checkpoint(config, params, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, load_hf_checkpoint(str(tmp_path))[1], reference)
  params = jax.device_get(params)  # numpy, on the host
  if scan_layers:
    params = unstack_layer_params(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)


# --------------------------------------------------------------------------------------------------
# Errors: one clear line, raised before any tensor data is read
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(checkpoints, tmp_path):
  path = str(tmp_path / "ckpt")
  shutil.copytree(checkpoints["llama_untied_llama3_rope"][0], path)
  return path


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def _edit_tensors(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = safetensors_torch.load_file(file)
  edit(tensors)
  safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


def test_error_unsupported_architecture(llama_copy):
  _edit_config(llama_copy, architectures=["GPT2LMHeadModel"])
  with pytest.raises(ValueError, match=r"^architecture: GPT2LMHeadModel is not supported; supported: "
                                       r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM$"):
    load_hf_checkpoint(llama_copy)


@pytest.mark.parametrize("changes, message", [
    (dict(attention_bias=True), "^attention_bias: LlamaForCausalLM with attention_bias=True"),
    (dict(hidden_act="gelu"), "^hidden_act:"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "^rope_scaling: rope_type 'yarn'"),
    (dict(num_attention_heads=3), "^num_heads: must be divisible by num_kv_heads=2"),
])
def test_error_unsupported_config(llama_copy, changes, message):
  _edit_config(llama_copy, **changes)
  with pytest.raises(ValueError, match=message):
    load_hf_checkpoint(llama_copy)


def test_error_missing_tensor(llama_copy):
  _edit_tensors(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj\.weight: missing from the checkpoint"):
    load_hf_checkpoint(llama_copy)


def test_error_shape_mismatch(llama_copy):
  _edit_config(llama_copy, intermediate_size=96)
  with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.gate_proj\.weight: shape mismatch with config\.json: "
                                       r"expected \(96, 64\), got \(128, 64\)$"):
    load_hf_checkpoint(llama_copy)


def test_error_unexpected_tensor(llama_copy):
  _edit_tensors(llama_copy, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
  with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.o_proj\.bias: unexpected tensor"):
    load_hf_checkpoint(llama_copy)


def test_missing_lm_head_means_tied(llama_copy):
  assert not load_hf_config(llama_copy).tie_word_embeddings  # an untied checkpoint
  _edit_tensors(llama_copy, lambda t: t.pop("lm_head.weight"))
  config, params = load_hf_checkpoint(llama_copy)
  assert config.tie_word_embeddings and "lm_head" not in params
  assert load_hf_config(llama_copy) == config  # the config alone says the same, from the headers


def test_error_missing_files(checkpoints, llama_copy, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory does not exist"):
    load_hf_checkpoint(str(tmp_path / "nowhere"))
  only_pickle = tmp_path / "only_pickle"
  only_pickle.mkdir()
  shutil.copy(os.path.join(llama_copy, "config.json"), only_pickle / "config.json")
  (only_pickle / "pytorch_model.bin").write_bytes(b"never unpickled")
  with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
    load_hf_checkpoint(str(only_pickle))
  os.remove(os.path.join(llama_copy, "config.json"))
  with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
    load_hf_checkpoint(llama_copy)


def test_error_bad_shardings_tree(checkpoints):
  path, _ = checkpoints["qwen3_tied"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match="^shardings: tree does not match"):
    load_hf_checkpoint(path, shardings={"embed": {"embedding": device}})


def test_error_save_architecture_mismatch(checkpoints, tmp_path):
  config, params = load_hf_checkpoint(checkpoints["qwen3_tied"][0])
  with pytest.raises(ValueError, match="^architecture: Qwen2ForCausalLM needs qkv_bias=True and qk_norm=False"):
    save_hf_checkpoint(config, params, str(tmp_path), architecture="Qwen2ForCausalLM")
  with pytest.raises(ValueError, match="^architecture: MistralForCausalLM is not supported"):
    save_hf_checkpoint(config, params, str(tmp_path), architecture="MistralForCausalLM")
