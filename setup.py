from setuptools import find_packages, setup

setup(
    name="stepjax",
    version="0.1.0",
    description="Step-level agentic reinforcement learning of language-model agents, natively in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["stepjax", "stepjax.*"]),
    install_requires=[
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "tensorflow-datasets",
        "array_record",  # tfds's on-disk format for stepjax.data (read without TensorFlow)
        "importlib_resources",  # tfds 4.9 imports it to prepare a dataset but declares it only for Python < 3.9
        "bm25s",  # the search-QA environment's retriever
        "ml-collections",
        "absl-py",
        "numpy",
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        # torch + transformers only as references for parity tests and side-by-side benchmarks.
        "test": ["pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "torch", "transformers", "textworld"],
        # experiments/: progress bars, TensorBoard event files (no TensorFlow), plots.
        "experiments": ["tqdm", "tensorboardX", "matplotlib"],
        # notebooks/: execute the Colab notebooks (nbclient) and check their jupytext .py twins.
        "notebooks": ["jupytext", "nbclient", "nbformat", "ipykernel"],
        "dev": ["ruff"],
    },
)
