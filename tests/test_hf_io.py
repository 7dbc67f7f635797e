"""save_hf / load_hf: transformers round trips, both expert layouts, shards, FP8, clear errors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import deepjax as dj
from deepjax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from hf_reference import SMALL_V2, SMALL_V3, SMALL_V32, hf_logits, hf_model, relative_error

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 13)).astype(np.int32)


def _logits(model):
  return np.asarray(model(jnp.asarray(TOKENS)).logits)


def _rewrite(path, fname, change):
  """Rewrites one safetensors file of a checkpoint through `change(dict) -> dict`."""
  f = SafetensorsFile(os.path.join(path, fname))
  tensors = change({k: np.array(f.get(k)) for k in f.keys()})
  write_safetensors(os.path.join(path, fname),
                    [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)


@pytest.mark.parametrize("base", [SMALL_V3, SMALL_V2, SMALL_V32], ids=["v3", "v2", "v3.2"])
def test_save_hf_loads_in_transformers(base, tmp_path):
  """V3.2's MTP layer (with its own indexer) is in the file; transformers skips it."""
  cfg = dj.ModelConfig(**dict(base, num_nextn_predict_layers=int(base is not SMALL_V2)))
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(7))
  dj.save_hf(model, str(tmp_path))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", dtype=torch.float32)
  assert relative_error(hf_logits(reference, TOKENS), _logits(model)) < 1e-5
  again = dj.load_hf(str(tmp_path))                           # MTP layer round-trips too
  np.testing.assert_array_equal(_logits(again), _logits(model))
  if cfg.num_nextn_predict_layers:
    np.testing.assert_array_equal(again(jnp.asarray(TOKENS)).mtp_logits,
                                  model(jnp.asarray(TOKENS)).mtp_logits)


def test_fused_expert_layout_loads(tmp_path):
  cfg = dj.ModelConfig(**SMALL_V3)
  reference = hf_model(cfg, seed=2)
  state = reference.state_dict()
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)   # transformers' layout
  save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
  assert relative_error(_logits(dj.load_hf(str(tmp_path))), hf_logits(reference, TOKENS)) < 1e-5


@pytest.mark.parametrize("base", [SMALL_V3, SMALL_V32], ids=["v3", "v3.2"])
def test_transformers_checkpoint_without_mtp_layers_loads(base, tmp_path, capsys):
  """transformers' save_pretrained drops the MTP layer but keeps num_nextn_predict_layers: the
  model loads without MTP modules and says so in one line."""
  cfg = dj.ModelConfig(**dict(base, num_nextn_predict_layers=1))
  reference = hf_model(cfg, seed=4)
  reference.save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
  model = dj.load_hf(str(tmp_path))
  assert model.cfg.num_nextn_predict_layers == 0
  assert "holds no MTP layer" in capsys.readouterr().out
  assert relative_error(_logits(model), hf_logits(reference, TOKENS)) < 1e-5


def test_partial_mtp_layer_is_named(tmp_path):
  cfg = dj.ModelConfig(**dict(SMALL_V3, num_nextn_predict_layers=1))
  dj.save_hf(dj.DeepSeek(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
  _rewrite(str(tmp_path), "model.safetensors",
           lambda t: {k: v for k, v in t.items() if k != "model.layers.3.enorm.weight"})
  with pytest.raises(KeyError, match="model.layers.3.enorm.weight"):
    dj.load_hf(str(tmp_path))


def test_sharded_checkpoint_with_index(tmp_path):
  model = dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(1))
  dj.save_hf(model, str(tmp_path), max_shard_bytes=64 * 1024)
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").exists()
  np.testing.assert_array_equal(_logits(dj.load_hf(str(tmp_path))), _logits(model))


def _quantize_fp8(w):
  """DeepSeek-V3 block quantization: e4m3 weights, one float32 scale per 128x128 block."""
  out, inp = w.shape
  blocks = (-(-out // 128), -(-inp // 128))
  scale = np.zeros(blocks, np.float32)
  q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
  for i in range(blocks[0]):
    for j in range(blocks[1]):
      tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
      scale[i, j] = np.abs(tile).max() / 448.0
      q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (tile / scale[i, j]).astype(q.dtype)
  return q, scale


@pytest.mark.parametrize("base", [SMALL_V3, SMALL_V32], ids=["v3", "v3.2"])
def test_fp8_block_quantized_weights_dequantize(base, tmp_path):
  """The hub's layout: every projection in e4m3 with 128x128 scales (V3.2: the indexer's wq_b
  and wk too; its weights_proj stays unquantized), partial blocks at the edges."""
  cfg = dj.ModelConfig(**dict(base, hidden_size=160, intermediate_size=272))
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(3))
  dj.save_hf(model, str(tmp_path))
  expected = {}

  def quantize(tensors):
    out = {}
    for name, w in tensors.items():
      quantized = name.endswith(("proj.weight", "indexer.wq_b.weight", "indexer.wk.weight"))
      if quantized and "weights_proj" not in name and w.ndim == 2:
        q, scale = _quantize_fp8(w)
        out[name], out[name + "_scale_inv"] = q, scale
        expected[name] = q.astype(np.float32) * np.kron(scale, np.ones((128, 128)))[
            :w.shape[0], :w.shape[1]]
      else:
        out[name] = w
    return out

  _rewrite(str(tmp_path), "model.safetensors", quantize)
  loaded = dj.load_hf(str(tmp_path))
  dj.save_hf(loaded, str(tmp_path / "dequantized"))          # read every weight back
  back = SafetensorsFile(str(tmp_path / "dequantized" / "model.safetensors"))
  assert len(expected) > 20
  for name, w in expected.items():
    np.testing.assert_allclose(back.get(name), w, rtol=1e-6, err_msg=name)
  # e4m3 keeps 3 mantissa bits: logits move by a few percent, no more.
  assert relative_error(_logits(loaded), _logits(model)) < 0.3


@pytest.fixture
def saved(tmp_path):
  dj.save_hf(dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(0)), str(tmp_path))
  return str(tmp_path)


def test_unknown_tensor_is_named(saved):
  _rewrite(saved, "model.safetensors", lambda t: {**t, "model.layers.0.mystery": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match="model.layers.0.mystery"):
    dj.load_hf(saved)


def test_missing_tensor_is_named(saved):
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  _rewrite(saved, "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(KeyError, match=name.replace(".", r"\.")):
    dj.load_hf(saved)


def test_shape_mismatch_is_named(saved):
  name = "model.layers.0.self_attn.kv_b_proj.weight"
  _rewrite(saved, "model.safetensors", lambda t: {**t, name: t[name][:, :-1]})
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    dj.load_hf(saved)


def test_wrong_dtype_is_named(saved):
  name = "model.norm.weight"
  _rewrite(saved, "model.safetensors", lambda t: {**t, name: t[name].astype(np.int32)})
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    dj.load_hf(saved)


def test_truncated_file_and_missing_config(saved):
  path = os.path.join(saved, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(ValueError, match="truncated"):
    dj.load_hf(saved)
  os.remove(os.path.join(saved, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    dj.load_hf(saved)
