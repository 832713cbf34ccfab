"""unclip-jax: unCLIP (DALL-E 2) in JAX and Flax NNX.

`install_requires` states compatible ranges, so that `pip install unclip-jax` keeps the jax,
numpy and Pillow that a Colab runtime, a TPU VM or a CUDA image already has. The exact versions
this project is tested with live in requirements/constraints.txt, which `make` and CI use:

    pip install -c requirements/constraints.txt -e ".[train,test]"

Extras:
    train    tf.data, TensorFlow Datasets and TensorBoard's writer: what `unclip-jax train`,
             `precompute` and the Shapes dataset builder read data with (sampling needs none of it;
             Colab ships TensorFlow already, so there it needs no extra)
    tpu      jax[tpu]: libtpu for Cloud TPU VMs
    cuda12   jax[cuda12]: the CUDA 12 plugin and its pip-installed CUDA libraries
    cuda13   jax[cuda13]: the same for CUDA 13
    hub      huggingface_hub, to download released weights (Karlo) by Hub id
    test     the suite's references (torch CPU, diffusers, transformers), pytest, what runs the
             notebook headless (ipykernel, nbclient, nbformat) and a fake GCS bucket
             (gcp-storage-emulator, gcsfs) for the remote-path tests
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.0",                 # flax 0.12 needs it; 0.10 and 0.11 are tested
    "flax>=0.12.8,<0.13",          # the NNX API as used here
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "ml-collections>=1.0.0",
    "etils[epath]>=1.9.0",         # one path layer for local and remote (gs://) paths
    "numpy>=1.26",
    "scipy>=1.11",
    "safetensors>=0.4.3",
    "pillow>=10.0",
    "ftfy>=6.1",                   # CLIP's caption cleaning, as OpenAI CLIP and Karlo apply it
    "regex>=2023.0",
    "tqdm>=4.60",
]

JAX_EXTRA = "jax[{}]>=0.10.0"
TRAIN = [
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.4",
    "tensorboard>=2.16",
]

EXTRAS = {
    "train": TRAIN,
    "tpu": [JAX_EXTRA.format("tpu")],
    "cuda12": [JAX_EXTRA.format("cuda12")],
    "cuda13": [JAX_EXTRA.format("cuda13")],
    "hub": ["huggingface_hub>=0.24"],
    # References for the parity tests. torch is pinned exactly: a looser range makes pip pull
    # the CUDA build (several GB).
    "test": TRAIN + [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "diffusers>=0.32",
        "transformers>=4.45",
        "huggingface_hub>=0.24",
        # tests/test_colab.py and scripts/execute_notebook.py: the notebook's kernel and runner
        "ipykernel>=6.29",
        "nbclient>=0.10",
        "nbformat>=5.10",
        # tests/test_remote_paths.py: a fake GCS bucket on 127.0.0.1, read and written by gcsfs
        "gcsfs>=2024.6",
        "gcp-storage-emulator>=2024.8",
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
