"""Hugging Face CLIP import: parity with transformers on random weights, and clear errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig as HFConfig, CLIPModel

from unclip_jax.convert.hf_clip import (CheckpointError, CheckpointMismatchError, from_pretrained,
                                       save_pretrained, to_hf_state_dict)

EOS = 49407

CONFIGS = {
    # quick_gelu, patch 4, OpenAI eos id, 12 text positions used out of 77.
    "quick_gelu": dict(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, image_size=16, patch_size=4,
                           hidden_act="quick_gelu"),
        projection_dim=24),
    # exact gelu, other widths/heads/eps/projection, a short context and the legacy eos id 2.
    "gelu": dict(
        text_config=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-6,
                         max_position_embeddings=20, eos_token_id=2),
        vision_config=dict(hidden_size=24, intermediate_size=50, num_hidden_layers=2,
                           num_attention_heads=2, image_size=24, patch_size=8,
                           hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=16),
}


def _hf_model(name: str) -> CLIPModel:
    torch.manual_seed({"quick_gelu": 0, "gelu": 1}[name])
    model = CLIPModel(HFConfig(**CONFIGS[name])).eval()
    with torch.no_grad():  # every tensor random, LayerNorms and biases far from 1 / 0
        for pname, p in model.named_parameters():
            if pname.endswith("logit_scale"):
                p.fill_(3.3)
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (hf model, folder)."""
    out = {}
    for name in CONFIGS:
        model = _hf_model(name)
        folder = str(tmp_path_factory.mktemp(name.replace("_", "")))
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _inputs(image_size: int, length: int = 12):
    rs = np.random.RandomState(0)
    ids = rs.randint(1, 49406, (3, length))
    ids[0, 4:] = EOS            # EOS then EOS padding
    ids[1, 9] = EOS             # EOS then zero padding
    ids[1, 10:] = 0
    ids[2, -1] = EOS            # EOS in the last position
    pixels = rs.randn(3, 3, image_size, image_size).astype(np.float32)  # NCHW for torch
    return ids, pixels


def _rel(ours, ref) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def _features(out):  # transformers 5 returns a ModelOutput; older versions a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(saved, name):
    hf, folder = saved[name]
    model = from_pretrained(folder)
    cfg = model.config
    hf_cfg = CONFIGS[name]
    assert cfg.activation == hf_cfg["text_config"]["hidden_act"]
    assert cfg.embed_dim == hf_cfg["projection_dim"]
    assert cfg.layer_norm_eps == hf_cfg["text_config"].get("layer_norm_eps", 1e-5)

    ids, pixels = _inputs(cfg.image_size)
    with torch.no_grad():
        text_out = hf.get_text_features(input_ids=torch.tensor(ids))
        image_out = hf.get_image_features(pixel_values=torch.tensor(pixels))
        hidden_ref = hf.text_model(input_ids=torch.tensor(ids)).last_hidden_state
    text_embeds, hidden = model.encode_text(jnp.asarray(ids, jnp.int32))
    image_embeds = model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)))

    assert _rel(text_embeds, _features(text_out)) < 1e-4
    assert _rel(hidden, hidden_ref) < 1e-4
    assert _rel(image_embeds, _features(image_out)) < 1e-4
    assert model.logit_scale[...].shape == ()
    np.testing.assert_allclose(model.logit_scale[...], hf.logit_scale.item(), rtol=1e-6)

    # Padding mask as well (keys hidden, absolute positions kept), the way HF applies it.
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        masked_ref = hf.text_model(input_ids=torch.tensor(ids),
                                   attention_mask=torch.tensor(mask)).last_hidden_state
    _, masked = model.encode_text(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    real = mask.astype(bool)
    assert _rel(np.asarray(masked)[real], masked_ref.numpy()[real]) < 1e-4


def test_sharded_and_bfloat16_checkpoints(saved, tmp_path):
    hf, folder = saved["quick_gelu"]
    reference = to_hf_state_dict(from_pretrained(folder))

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    got = to_hf_state_dict(from_pretrained(sharded))
    assert set(got) == set(reference)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)

    half = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(half)
    hf.to(torch.float32)
    model = from_pretrained(half)
    assert model.text.token_embedding[...].dtype == jnp.float32
    got = to_hf_state_dict(model)
    for k in ("text_projection.weight", "vision_model.embeddings.patch_embedding.weight"):
        want = torch.tensor(reference[k]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got[k], want)


def test_save_pretrained_loads_in_transformers(saved, tmp_path):
    hf, folder = saved["gelu"]
    model = from_pretrained(folder)
    save_pretrained(model, tmp_path / "ours")
    back = CLIPModel.from_pretrained(tmp_path / "ours").eval()
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), theirs[k], err_msg=k)
    assert back.config.text_config.eos_token_id == 2
    assert back.config.vision_config.hidden_act == "gelu"


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "empty")


def test_non_clip_config(saved, tmp_path):
    folder = _copy(saved["quick_gelu"][1], tmp_path / "bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="not a CLIP config.*'bert'"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(CheckpointError, match="single CLIP tower"):
        from_pretrained(folder)


def test_missing_and_unexpected_tensors_listed_together(saved, tmp_path):
    folder = _copy(saved["quick_gelu"][1], tmp_path / "edited")
    tensors = load_file(folder / "model.safetensors")
    del tensors["text_model.final_layer_norm.bias"]
    tensors["text_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    tensors["text_model.embeddings.position_ids"] = np.arange(77)[None]  # ignored buffer
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(folder)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["text_model.final_layer_norm.bias"]
    assert err.unexpected == ["text_model.extra_head.weight"]
    assert "text_model.final_layer_norm.bias" in str(err)
    assert "text_model.extra_head.weight" in str(err)
    assert "position_ids" not in str(err)


def test_shape_mismatch_names_tensor_and_shapes(saved, tmp_path):
    folder = _copy(saved["quick_gelu"][1], tmp_path / "shape")
    tensors = load_file(folder / "model.safetensors")
    tensors["visual_projection.weight"] = np.zeros((25, 48), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError,
                       match=r"visual_projection\.weight has shape \(25, 48\).*\(24, 48\)"):
        from_pretrained(folder)


def test_pickle_only_folder_is_refused(saved, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(os.path.join(saved["quick_gelu"][1], "config.json"), folder)
    torch.save({"logit_scale": torch.tensor(1.0)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        from_pretrained(folder)
