"""Flax NNX modules of the DeepSeek-V2/V3 model."""

from deepjax.model.moe import RouterStats
from deepjax.model.router import RouterBias
from deepjax.model.transformer import DeepSeek, ModelOutput
