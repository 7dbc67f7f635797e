"""transformers / hub checkpoints <-> deepjax models.

`load_hf(path)` reads `config.json` and (sharded, indexed) safetensors tensor by tensor into an
abstractly built model, so the weights are never held twice. It accepts both expert layouts --
the hub's per-expert `mlp.experts.{e}.gate_proj.weight` and transformers' in-memory fused
`mlp.experts.gate_up_proj` / `down_proj` -- dequantizes DeepSeek-V3's float8 weights with their
128x128 `weight_scale_inv` blocks, and loads MTP layers (index num_hidden_layers + k) into the MTP
modules. `save_hf(model, path)` writes the hub layout, which transformers' from_pretrained loads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from deepjax.config import ModelConfig
from deepjax.model import DeepSeek

FP8_BLOCK = 128
# Tensors some checkpoints carry that deepjax derives instead of storing.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One deepjax parameter and where it lives in a transformers checkpoint.

  kind "linear": HF [out, in] = our kernel^T. "copy": same layout. "experts": our [E, in, out]
  stacked from HF per-expert [out, in] (`{prefix}.{e}.{proj}.weight`) or fused tensors.
  """
  hf_name: str
  path: tuple
  kind: str


def _block_entries(cfg: ModelConfig, hf: str, path: tuple, layer_idx: int) -> list[Entry]:
  out = []

  def add(name, sub, kind):
    out.append(Entry(hf + name, path + sub, kind))

  def dense(name, sub, bias=False):
    add(f"{name}.weight", sub + ("kernel",), "linear")
    if bias:
      add(f"{name}.bias", sub + ("bias",), "copy")

  def norm(name, sub):
    add(f"{name}.weight", sub + ("weight",), "copy")

  attn = ("self_attn",)
  if cfg.q_lora_rank is None:
    dense("self_attn.q_proj", attn + ("q_proj",))
  else:
    dense("self_attn.q_a_proj", attn + ("q_a_proj",), cfg.attention_bias)
    norm("self_attn.q_a_layernorm", attn + ("q_a_layernorm",))
    dense("self_attn.q_b_proj", attn + ("q_b_proj",))
  dense("self_attn.kv_a_proj_with_mqa", attn + ("kv_a_proj_with_mqa",), cfg.attention_bias)
  norm("self_attn.kv_a_layernorm", attn + ("kv_a_layernorm",))
  dense("self_attn.kv_b_proj", attn + ("kv_b_proj",))
  dense("self_attn.o_proj", attn + ("o_proj",), cfg.attention_bias)
  if cfg.attention_kind(layer_idx) == "dsa":              # V3.2's lightning indexer
    index = attn + ("indexer",)
    dense("self_attn.indexer.wq_b", index + ("wq_b",))
    dense("self_attn.indexer.wk", index + ("wk",))
    dense("self_attn.indexer.weights_proj", index + ("weights_proj",))
    norm("self_attn.indexer.k_norm", index + ("k_norm",))
    add("self_attn.indexer.k_norm.bias", index + ("k_norm", "bias"), "copy")
  norm("input_layernorm", ("input_layernorm",))
  norm("post_attention_layernorm", ("post_attention_layernorm",))
  if cfg.is_moe_layer(layer_idx):
    add("mlp.gate.weight", ("mlp", "gate", "kernel"), "linear")
    if cfg.uses_correction_bias:
      add("mlp.gate.e_score_correction_bias", ("mlp", "gate", "e_score_correction_bias"), "copy")
    for proj in ("gate_proj", "up_proj", "down_proj"):
      add(f"mlp.experts.{proj}", ("mlp", "experts", proj), "experts")
    mlps = [("mlp.shared_experts", ("mlp", "shared_experts"))] if cfg.n_shared_experts else []
  else:
    mlps = [("mlp", ("mlp",))]
  for name, sub in mlps:
    for proj in ("gate_proj", "up_proj", "down_proj"):
      dense(f"{name}.{proj}", sub + (proj,), cfg.mlp_bias)
  return out


def hf_entries(cfg: ModelConfig) -> list[Entry]:
  """Every deepjax parameter of a model with this config and its checkpoint name."""
  entries = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), "copy")]
  for i in range(cfg.num_hidden_layers):
    entries += _block_entries(cfg, f"model.layers.{i}.", ("layers", i), i)
  entries.append(Entry("model.norm.weight", ("norm", "weight"), "copy"))
  if not cfg.tie_word_embeddings:
    entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), "linear"))
  for k in range(cfg.num_nextn_predict_layers):
    i = cfg.num_hidden_layers + k
    hf, path = f"model.layers.{i}.", ("mtp", k)
    entries += [Entry(hf + "enorm.weight", path + ("enorm", "weight"), "copy"),
                Entry(hf + "hnorm.weight", path + ("hnorm", "weight"), "copy"),
                Entry(hf + "eh_proj.weight", path + ("eh_proj", "kernel"), "linear"),
                Entry(hf + "shared_head.norm.weight", path + ("final_norm", "weight"), "copy")]
    entries += _block_entries(cfg, hf, path + ("block",), i)
  return entries


def _shared_mtp_names(cfg: ModelConfig) -> set[str]:
  """The MTP layers' copies of the embedding and head: deepjax shares the main ones."""
  names = set()
  for k in range(cfg.num_nextn_predict_layers):
    i = cfg.num_hidden_layers + k
    names |= {f"model.layers.{i}.embed_tokens.weight", f"model.layers.{i}.shared_head.head.weight"}
  return names


# --- loading -------------------------------------------------------------------------------


class _Checkpoint:
  """All tensors of a checkpoint directory, by name, across shards."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    else:
      shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no index")
      files = {}
      for shard in shards:
        for name in SafetensorsFile(os.path.join(path, shard)).keys():
          files[name] = os.path.join(path, shard)
    self._files = files
    self._open: dict[str, SafetensorsFile] = {}
    missing = sorted({f for f in files.values() if not os.path.exists(f)})
    if missing:
      raise FileNotFoundError(f"{path}: the index names missing shard files {missing}")

  def names(self) -> set[str]:
    return set(self._files)

  def __contains__(self, name):
    return name in self._files

  def file(self, name) -> SafetensorsFile:
    fname = self._files[name]
    if fname not in self._open:
      self._open[fname] = SafetensorsFile(fname)
    return self._open[fname]

  def read(self, name: str) -> np.ndarray:
    """The tensor as float32 numpy, dequantizing float8 weights with their scale blocks."""
    f = self.file(name)
    array = f.get(name)
    if array.dtype.kind not in "fV":                    # ml_dtypes' bf16 / fp8 are kind "V"
      raise ValueError(f"tensor {name!r}: expected floating point weights, got {array.dtype}")
    if "float8" in array.dtype.name:
      scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
      if scale_name not in self:
        raise ValueError(f"tensor {name!r} is {array.dtype.name} but has no {scale_name!r}")
      return dequantize_fp8(array, self.file(scale_name).get(scale_name), name)
    return array.astype(np.float32)


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, name: str = "weight") -> np.ndarray:
  """W = W_fp8 * scale_inv[i // 128, j // 128] (DeepSeek-V3 block-wise quantization)."""
  out, inp = weight.shape
  expected = (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))
  if scale_inv.shape != expected:
    raise ValueError(f"tensor {name!r}: weight_scale_inv shape {scale_inv.shape}, expected "
                     f"{expected} for 128x128 blocks of a {weight.shape} weight")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)
  return weight.astype(np.float32) * scale[:out, :inp]


def _read_entry(ckpt: _Checkpoint, entry: Entry, cfg: ModelConfig, used: set) -> np.ndarray:
  if entry.kind != "experts":
    if entry.hf_name not in ckpt:
      raise KeyError(f"checkpoint is missing tensor {entry.hf_name!r}")
    used.add(entry.hf_name)
    array = ckpt.read(entry.hf_name)
    return array.T if entry.kind == "linear" else array

  prefix, proj = entry.hf_name.rsplit(".", 1)           # "model.layers.3.mlp.experts", "up_proj"
  fused = f"{prefix}.gate_up_proj" if proj != "down_proj" else f"{prefix}.down_proj"
  if fused in ckpt:                                      # transformers' in-memory layout
    used.add(fused)
    array = ckpt.read(fused)                             # [E, 2I, H] or [E, H, I]
    if proj != "down_proj":
      i = cfg.moe_intermediate_size
      array = array[:, :i] if proj == "gate_proj" else array[:, i:]
    return np.swapaxes(array, 1, 2)
  stacked = None
  for e in range(cfg.n_routed_experts):                  # hub layout, one expert at a time
    name = f"{prefix}.{e}.{proj}.weight"
    if name not in ckpt:
      raise KeyError(f"checkpoint is missing tensor {name!r} (and has no fused {fused!r})")
    used.add(name)
    w = ckpt.read(name).T
    if stacked is None:
      stacked = np.empty((cfg.n_routed_experts,) + w.shape, np.float32)
    if w.shape != stacked.shape[1:]:
      raise ValueError(f"tensor {name!r}: shape {w.T.shape}, expected {stacked.shape[:0:-1]}")
    stacked[e] = w
  return stacked


def _without_absent_mtp(cfg: ModelConfig, ckpt: "_Checkpoint", path: str) -> ModelConfig:
  """transformers drops MTP modules (V3 and V3.2 alike) but keeps num_nextn_predict_layers in
  config.json: a checkpoint with no tensor of any MTP layer loads without MTP modules, and says
  so. One with some of them is still read, and a missing tensor is an error naming it."""
  mtp = [f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers)]
  if not mtp or any(n.startswith(tuple(mtp)) for n in ckpt.names()):
    return cfg
  print(f"load_hf: {path} holds no MTP layer (config.json: num_nextn_predict_layers="
        f"{cfg.num_nextn_predict_layers}; transformers does not save them): loading without MTP")
  return cfg.replace(num_nextn_predict_layers=0)


def load_hf(path: str, dtype=jnp.float32, **overrides) -> DeepSeek:
  """A DeepSeek model with the weights of a transformers/hub DeepseekV2, V3 or V3.2 directory.

  `dtype` becomes both the parameter and the compute dtype; `overrides` set other ModelConfig
  fields (e.g. attention_impl="pallas"). Raises naming the tensor for unknown or missing
  tensors and shape mismatches.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no config.json (expected a transformers checkpoint dir)")
  with open(config_path) as f:
    hf_config = json.load(f)
  name = jnp.dtype(dtype).name
  cfg = ModelConfig.from_hf(hf_config, **{"dtype": name, "param_dtype": name, **overrides})
  ckpt = _Checkpoint(path)
  cfg = _without_absent_mtp(cfg, ckpt, path)

  abstract = nnx.eval_shape(lambda: DeepSeek(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  used: set[str] = set()
  for entry in hf_entries(cfg):
    if entry.path not in flat:
      raise AssertionError(f"deepjax has no parameter {entry.path} for {entry.hf_name}")
    variable = flat[entry.path]
    array = _read_entry(ckpt, entry, cfg, used)
    if array.shape != variable.shape:
      raise ValueError(f"tensor {entry.hf_name!r}: shape {array.shape} (as deepjax lays it out) "
                       f"does not match the config's {variable.shape}")
    variable.set_value(jnp.asarray(array, dtype=variable.dtype))
    del array
  unknown = ckpt.names() - used - _shared_mtp_names(cfg)
  unknown = {n for n in unknown if not n.endswith(_DERIVED_SUFFIXES)
             and not n.endswith(".weight_scale_inv")}
  if unknown:
    raise ValueError(f"checkpoint has tensors deepjax does not know: {sorted(unknown)[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --- saving --------------------------------------------------------------------------------


def _hf_tensors(model: DeepSeek):
  """(name, shape, producer) for every tensor of the hub layout, in checkpoint order."""
  cfg = model.cfg
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  value = lambda path: np.asarray(jax.device_get(flat[path][...]))  # noqa: E731
  for entry in hf_entries(cfg):
    shape = flat[entry.path].shape
    if entry.kind == "copy":
      yield entry.hf_name, shape, (lambda p=entry.path: value(p))
    elif entry.kind == "linear":
      yield entry.hf_name, shape[::-1], (lambda p=entry.path: value(p).T)
    else:
      prefix, proj = entry.hf_name.rsplit(".", 1)
      for e in range(shape[0]):
        yield (f"{prefix}.{e}.{proj}.weight", (shape[2], shape[1]),
               lambda p=entry.path, e=e: np.asarray(jax.device_get(flat[p][e])).T)
  for k in range(cfg.num_nextn_predict_layers):          # the hub stores shared copies
    i = cfg.num_hidden_layers + k
    emb = ("embed_tokens", "embedding")
    yield (f"model.layers.{i}.embed_tokens.weight", flat[emb].shape, lambda: value(emb))
    if cfg.tie_word_embeddings:
      yield f"model.layers.{i}.shared_head.head.weight", flat[emb].shape, lambda: value(emb)
    else:
      head = ("lm_head", "kernel")
      yield (f"model.layers.{i}.shared_head.head.weight", flat[head].shape[::-1],
             lambda: value(head).T)


def save_hf(model: DeepSeek, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `config.json` and safetensors shards (with an index when there are several)."""
  cfg = model.cfg
  os.makedirs(path, exist_ok=True)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  tensors = list(_hf_tensors(model))
  shards, current, size = [], [], 0
  for name, shape, produce in tensors:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, shape, produce))
    size += nbytes
  shards.append(current)

  weight_map = {}
  for s, shard in enumerate(shards):
    fname = "model.safetensors" if len(shards) == 1 else \
        f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    producers = {name: produce for name, _, produce in shard}
    write_safetensors(os.path.join(path, fname), [(n, sh, dtype) for n, sh, _ in shard],
                      lambda name: producers[name]())
    weight_map.update({name: fname for name, _, _ in shard})
  if len(shards) > 1:
    total = sum(int(np.prod(sh)) * dtype.itemsize for _, sh, _ in tensors)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)
