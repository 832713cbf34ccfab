"""The Shapes dataset as a TensorFlow Datasets builder, registered as ``"shapes"``.

Importing this module registers it; after that, with no network::

    import tensorflow_datasets as tfds
    from unclip_jax.data import shapes_builder  # noqa: F401  (registers "shapes")

    tfds.builder("shapes/tiny", data_dir=d).download_and_prepare()   # generates, downloads nothing
    ds = tfds.load("shapes/tiny", split="train", data_dir=d)

or from the command line: ``unclip-jax shapes --data-dir DIR [--config tiny|default]``.

Configs: ``default`` (50,000 train / 2,000 test, seed 0) and ``tiny`` (64 / 32, seed 0, for
tests). Other sizes and seeds: :func:`make_config` (``tfds.builder("shapes",
config=make_config(1000, 100, seed=3), data_dir=d)``), stored under its own config name
``n{train}-{test}-s{seed}``.

Each example (key: its index in the split) holds the image and its ground truth:
``image`` uint8 128 x 128 x 3 (PNG), ``caption``, ``num_objects``, ``relation`` ("" for one object),
``position`` ("" for two objects), ``index``, and ``objects``: a sequence of ``{colour, shape,
size, cx, cy, side}`` (canvas fractions; for two objects, the caption's first object first).
Example ``i`` of a split is :func:`unclip_jax.data.shapes.example` ``(seed, split, i)``, so the
dataset can also be regenerated, or extended, without TFDS.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from unclip_jax.data import shapes

NAME = "shapes"


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes of the splits and the seed they are generated from."""

    num_train: int = 50_000
    num_test: int = 2_000
    seed: int = 0


def make_config(num_train: int, num_test: int, seed: int = 0) -> ShapesConfig:
    """A config for any split sizes and seed, named ``n{train}-{test}-s{seed}``."""
    if num_train < 0 or num_test < 0 or seed < 0:
        raise ValueError(f"num_train, num_test and seed must be non-negative, got {num_train}, "
                         f"{num_test}, {seed}.")
    return ShapesConfig(name=f"n{num_train}-{num_test}-s{seed}",
                        description=f"{num_train} train / {num_test} test examples, seed {seed}.",
                        num_train=num_train, num_test=num_test, seed=seed)


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural coloured shapes with exact captions (unclip-jax; the rules are in unclip_jax/data/shapes.py)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="50,000 train / 2,000 test examples, seed 0.",
                     num_train=50_000, num_test=2_000, seed=0),
        ShapesConfig(name="tiny", description="64 train / 32 test examples, seed 0 (tests).",
                     num_train=64, num_test=32, seed=0),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    # TFDS's own lookup of this file goes through the `importlib_resources` backport, which it
    # does not declare as a dependency (and which is not installed); the answer is simply this file.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(shapes.CANVAS, shapes.CANVAS, 3),
                                             encoding_format="png"),
                "caption": text,
                "num_objects": np.int32,
                "relation": text,
                "position": text,
                "index": np.int64,
                "objects": tfds.features.Sequence({
                    "colour": text, "shape": text, "size": text,
                    "cx": np.float32, "cy": np.float32, "side": np.float32,
                }),
            }),
            supervised_keys=("image", "caption"),
            homepage="https://github.com/unclip-jax",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, n: int):
        seed = self.builder_config.seed
        for i in range(n):
            image, scene = shapes.example(seed, split, i)
            yield i, to_features(image, scene, i)


def to_features(image: np.ndarray, scene: shapes.Scene, index: int) -> dict:
    """One TFDS example dict from an image and its scene."""
    return {
        "image": image,
        "caption": scene.caption,
        "num_objects": len(scene.objects),
        "relation": scene.relation or "",
        "position": scene.position or "",
        "index": index,
        "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size,
                     "cx": o.cx, "cy": o.cy, "side": o.side} for o in scene.objects],
    }


def builder(data_dir: str, config: str | ShapesConfig = "default") -> Shapes:
    """The builder for ``config`` (a name or a :class:`ShapesConfig`) under ``data_dir``."""
    return Shapes(config=config, data_dir=data_dir)


def build(data_dir: str, config: str | ShapesConfig = "default") -> Shapes:
    """Generate and write the dataset (offline); returns the prepared builder."""
    b = builder(data_dir, config)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return b
