"""Flax NNX modules of the DeepSeek model, built from per-layer kinds."""

from deepjax.model.block import layer_cache
from deepjax.model.mla import MLACache
from deepjax.model.moe import RouterStats
from deepjax.model.router import RouterBias
from deepjax.model.transformer import DeepSeek, ModelOutput
