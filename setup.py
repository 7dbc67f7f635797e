"""deepjax: DeepSeek-style MoE language models in JAX / Flax NNX, with Pallas kernels."""

from setuptools import find_packages, setup

setup(
    name="deepjax",
    version="0.1.0",
    description="JAX/TPU-native research library for DeepSeek-style Mixture-of-Experts models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deepjax", "deepjax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorstore",
        "absl-py",
        "ml-collections",
        "numpy",
        "ml-dtypes",
        "safetensors",
        "tokenizers",
        "array-record",
        "tensorboardX",
        "matplotlib",  # the training loop writes loss and expert-load plots
    ],
    extras_require={
        # torch: install the CPU build first (pip install torch==2.13.0), see BUILD.md.
        # triton: its compiler and ptxas report the kernels' GPU registers and shared memory.
        "test": ["pytest", "pytest-timeout", "torch", "transformers>=5.0", "nbclient", "nbformat",
                 "ipykernel", "triton==3.9.0; sys_platform == 'linux'"],
        "notebook": ["jupyter", "nbclient", "nbformat", "ipykernel"],
    },
)
