"""deepjax: DeepSeek-style Mixture-of-Experts language models in JAX / Flax NNX."""

from deepjax.config import ModelConfig
from deepjax.model import DeepSeek, ModelOutput, RouterStats
from deepjax.checkpoint.hf import load_hf, save_hf
from deepjax.inference import generate, generate_with_stats
