"""g2rpo_jax: Gaussian GRPO (G²RPO) for multimodal RL in JAX/Flax.

Install for development and testing:  pip install -e ".[test]"
Every version below is pinned to a stack tested together on Python 3.11 (CPU).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    # Data: TFDS without TensorFlow (array_record + data_source), grain for loading.
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "importlib_resources==7.1.0",
    # Visual tasks: real handwritten digits (bundled with scikit-learn), rendering, plots.
    "scikit-learn==1.9.1",
    "pillow==13.0.0",
    "matplotlib==3.11.2",
    # Metrics and tokenizers.
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "hypothesis==6.170.15",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "psutil",
        # Parity tests of the Qwen2.5-VL port against the PyTorch reference.
        "torch==2.13.0",
        "transformers==5.23.0",
    ],
    # The PyTorch reference for checking real-model ports (experiments/check_parity.py).
    "hf": [
        "torch==2.13.0",
        "transformers==5.23.0",
    ],
}

setup(
    name="g2rpo_jax",
    version="0.1.0",
    description="Gaussian GRPO (G²RPO) for multimodal RL in JAX/Flax",
    packages=find_packages(include=["g2rpo_jax", "g2rpo_jax.*", "experiments", "experiments.*", "configs"]),
    package_data={"g2rpo_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
