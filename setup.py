"""topkast-jax: Top-KAST (Top-K Always Sparse Training) for JAX / optax."""

from setuptools import find_packages, setup

setup(
    name="topkast-jax",
    version="0.1.0",
    description="Top-KAST: Top-K Always Sparse Training, as an optax gradient transformation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["topkast_jax", "topkast_jax.*"]),
    install_requires=["jax>=0.6", "optax>=0.2.4", "numpy>=1.26"],
    extras_require={
        "experiments": [
            "flax>=0.10",
            "ml_collections>=1.0",
            "absl-py>=2.0",
            "orbax-checkpoint>=0.11",
            "tensorflow-datasets>=4.9.8",
            "grain>=0.2.10",
            "tensorboardX>=2.6",
            "pillow>=10",
            "matplotlib>=3.8",
        ],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.6"],
    },
)
