"""Every config under configs/ loads, documents its command, and builds what it describes."""
import dataclasses
import glob
import os

import pytest

from unclip_jax.clip.model import CLIPConfig, get_preset, preset_names
from unclip_jax.config import load_config, load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_there_are_configs():
    assert {os.path.basename(p) for p in CONFIGS} >= {"clip.py", "demo.py"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_documents_its_command(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    assert source.startswith('"""'), "each config opens with a docstring"
    doc = source.split('"""')[1]
    assert "unclip-jax" in doc and "Expected" in doc, "the docstring gives the command and result"
    for spec in (path, f"{path}:runlocal"):
        config = load_config(spec)
        assert config.seed == 0


@pytest.mark.parametrize("size", preset_names())
def test_clip_config_builds_the_preset(size):
    config = load_file(os.path.join(REPO, "configs", "clip.py") + f":size={size}")
    fields = {k: v for k, v in config.model.items() if k != "preset"}
    built = CLIPConfig(**fields)
    preset = get_preset(size)
    assert dataclasses.replace(built) == dataclasses.replace(
        preset, text_mlp_dim=preset.text_mlp, vision_mlp_dim=preset.vision_mlp)
