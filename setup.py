"""unclip-jax: unCLIP (DALL-E 2) in JAX and Flax NNX.

Install with `make install` (virtual environment + pinned versions), or
`pip install -c requirements/constraints.txt -e .[test]` inside your own environment.
The exact pins below are the versions this project is tested with; the full
transitive set lives in requirements/constraints.txt.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "ftfy==6.3.1",
    "regex==2026.11.19",
    "tqdm==4.70.1",
    "absl-py==2.5.1",
    "tensorboard==2.21.0",
]

EXTRAS = {
    # Reference implementations for parity tests. torch is pinned exactly: a looser
    # range makes pip pull the CUDA build (several GB).
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "diffusers==0.42.1",
    ],
}

setup(
    name="unclip-jax",
    version="0.1.0",
    description="unCLIP (Hierarchical Text-Conditional Image Generation with CLIP Latents) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    package_data={"unclip_jax.clip": ["bpe_simple_vocab_16e6.txt.gz"],
                  "unclip_jax.assets": ["shapes/*.json", "shapes/*.safetensors"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["unclip-jax=unclip_jax.cli:main"]},
    license="Apache-2.0",
)
