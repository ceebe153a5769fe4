"""jaxclip: CLIP-style contrastive language-image pretraining in JAX."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="jaxclip",
    version="0.1.0",
    description="CLIP-style contrastive language-image pretraining in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxclip", "jaxclip.*"]),
    package_data={
        "jaxclip.data.assets": ["*.txt.gz", "LICENSE-*.txt"],
        "jaxclip.evaluate.assets": ["*.txt"],  # class names, prompts, their licence
    },
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "einops>=0.8",
        "absl-py",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "grain>=0.2.18",  # input pipelines (pulls array_record on Linux)
        "tokenizers>=0.19",  # the CLIP tokenizer's fast path
        "tensorboardX>=2.6",
        "safetensors>=0.4",  # weights in and out, read with NumPy (no torch needed)
    ],
    extras_require={
        # Reading and converting tfds datasets; TensorFlow itself is not needed.
        "tfds": ["tensorflow-datasets>=4.9.10", "array_record"],
        "sentencepiece": ["sentencepiece>=0.2"],  # SigLIP-style tokenizers
        "digits": ["scikit-learn"],  # data.source='digits': its bundled scans
        # XLA's TPU compiler (libtpu, matched to jax) for `python -m jaxclip.aot`:
        # compiles for a TPU slice on any machine, no TPU needed.
        "tpu": ["jax[tpu]"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "tensorboard>=2.15",
            "ruff",
            # Parity with the PyTorch originals, the HF round trip and the notebook.
            # OpenCLIP stays out: its wheel pulls a CUDA torch (its tests skip).
            "torch==2.13.0",
            "transformers>=4.45",
            "nbclient",
            "nbformat",
            "ipykernel",
            # The COCO caption evaluation, reference for caption_metrics.py (its BLEU
            # and CIDEr scorers are pure Python; only its tokenizer needs Java).
            "pycocoevalcap",
            "matplotlib",
            "scikit-image",
            "tensorflow-datasets>=4.9.10",
            "array_record",
            "sentencepiece>=0.2",
            "scikit-learn",
            "jax[tpu]",  # tests/test_aot.py compiles for small TPU slices
        ],
    },
)
