"""Every PriorTransformer option diffusers' unCLIP pipelines can run loads and matches diffusers
on random weights; the rest are refused naming the option. The decoder keeps its sample_size."""
import json
import os

import numpy as np
import pytest
import torch

from torch_reference import random_prior, randomize
from unclip_jax.convert.diffusers_prior import load_prior, save_prior
from unclip_jax.convert.diffusers_unet import load_decoder, load_super_res
from unclip_jax.torch_weights import CheckpointError

BASE = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
            num_embeddings=6, additional_embeddings=4)
VARIANTS = {
    "clip_embed_dim": dict(clip_embed_dim=24),
    "clip_embed_dim_narrow": dict(clip_embed_dim=5),
    "embedding_proj_dim": dict(embedding_proj_dim=10),
    "time_embed_dim": dict(time_embed_dim=20),
    "norm_in_type": dict(norm_in_type="layer"),
    "embedding_proj_norm_type": dict(embedding_proj_norm_type="layer", embedding_proj_dim=7),
    "encoder_hid_proj_type_none": dict(encoder_hid_proj_type=None),
    "added_emb_type_none": dict(added_emb_type=None, additional_embeddings=3),
    "num_embeddings_1": dict(num_embeddings=1),
    "act_gelu": dict(time_embed_act_fn="gelu"),
    "act_swish": dict(time_embed_act_fn="swish"),
    "act_mish": dict(time_embed_act_fn="mish"),
    "act_relu": dict(time_embed_act_fn="relu"),
    "act_upper_case": dict(time_embed_act_fn="SiLU"),
    "dropout": dict(dropout=0.1),
    "all_at_once": dict(clip_embed_dim=20, embedding_proj_dim=9, time_embed_dim=24,
                        norm_in_type="layer", embedding_proj_norm_type="layer",
                        encoder_hid_proj_type=None, added_emb_type=None,
                        additional_embeddings=3, num_embeddings=5, time_embed_act_fn="mish",
                        dropout=0.2),
}


def _inputs(c, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    n, d = c["num_embeddings"], c["embedding_dim"]
    width = d if c.get("encoder_hid_proj_type", "linear") else \
        c["num_attention_heads"] * c["attention_head_dim"]
    mask = np.zeros((batch, n), bool)
    for row, k in enumerate([n, 3, 1][:batch]):
        mask[row, :min(k, n)] = True
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(x=f(batch, d), t=np.array([0, 437, 999][:batch]),
                text_embed=f(batch, c.get("embedding_proj_dim") or d),
                text_hidden=f(batch, n, width), mask=mask)


def _reference(model, a):
    with torch.no_grad():
        out = model(hidden_states=torch.tensor(a["x"]), timestep=torch.tensor(a["t"]),
                    proj_embedding=torch.tensor(a["text_embed"]),
                    encoder_hidden_states=torch.tensor(a["text_hidden"]),
                    attention_mask=torch.tensor(a["mask"])).predicted_image_embedding
    return out.numpy().reshape(len(a["x"]), -1)  # [B, 1, D] without the prd token


def _check(ours, ref_model, config):
    a = _inputs(config)
    ref = _reference(ref_model, a)
    out = np.asarray(ours(a["x"], a["t"], a["text_embed"], a["text_hidden"], a["mask"]))
    assert out.shape == ref.shape == (3, config.get("clip_embed_dim") or config["embedding_dim"])
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    np.testing.assert_array_equal(np.asarray(ours.clip_mean[...]),
                                  ref_model.clip_mean.detach().numpy())
    np.testing.assert_array_equal(np.asarray(ours.clip_std[...]),
                                  ref_model.clip_std.detach().numpy())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prior_option_matches_diffusers(tmp_path, name):
    config = {**BASE, **VARIANTS[name]}
    ref_model = random_prior(seed=len(name), **config)
    ref_model.save_pretrained(tmp_path)
    ours = load_prior(tmp_path)
    _check(ours, ref_model, config)
    if name in ("all_at_once", "clip_embed_dim"):  # and back to diffusers
        from diffusers import PriorTransformer
        save_prior(ours, tmp_path / "back")
        again = PriorTransformer.from_pretrained(tmp_path / "back").eval()
        for key, value in config.items():
            want = value.lower() if isinstance(value, str) else value
            assert again.config[key] == want, key
        _check(ours, again, config)


def test_wider_prediction_cannot_normalise_or_sample(tmp_path):
    random_prior(**BASE, clip_embed_dim=24).save_pretrained(tmp_path)
    ours = load_prior(tmp_path)
    assert ours.config.out_dim == 24 and ours.config.output_dim == 24
    with pytest.raises(ValueError, match="clip_embed_dim"):
        ours.denormalise(np.zeros((1, 12), np.float32))


def _write(folder, **config):
    random_prior(**BASE).save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(config)
    with open(path, "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("config, message", [
    (dict(additional_embeddings=5), "additional_embeddings=5"),
    (dict(added_emb_type=None), "additional_embeddings=4"),  # 3 needed without the prd token
    (dict(num_embeddings=0), "num_embeddings=0"),
    (dict(norm_in_type="batch"), "norm_in_type='batch'"),
    (dict(embedding_proj_norm_type="group"), "embedding_proj_norm_type='group'"),
    (dict(encoder_hid_proj_type="mlp"), "encoder_hid_proj_type='mlp'"),
    (dict(added_emb_type="clip"), "added_emb_type='clip'"),
    (dict(time_embed_act_fn="tanh"), "time_embed_act_fn='tanh'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_prior_options_diffusers_cannot_run_are_refused(tmp_path, config, message):
    _write(tmp_path, **config)
    with pytest.raises(CheckpointError, match="Unsupported PriorTransformer") as err:
        load_prior(tmp_path)
    assert message in str(err.value)


DECODER = dict(
    in_channels=3, out_channels=6, block_out_channels=(8, 16), layers_per_block=1,
    attention_head_dim=8, cross_attention_dim=16, norm_num_groups=4,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type="identity",
    resnet_time_scale_shift="scale_shift")
CLIP = 12


def _decoder_folder(folder, sample_size=8, seed=0, **overrides):
    """decoder/ + text_proj/ as UnCLIPPipeline.save_pretrained writes them (random weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    unet = UNet2DConditionModel(sample_size=sample_size, **{**DECODER, **overrides}).eval()
    c = unet.config
    time_dim = (c.projection_class_embeddings_input_dim
                if c.class_embed_type in ("projection", "simple_projection")
                else c.time_embedding_dim or (2 if c.time_embedding_type == "fourier" else 4)
                * c.block_out_channels[0])
    ctx = c.encoder_hid_dim or c.cross_attention_dim
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP,
                               time_embed_dim=time_dim,
                               cross_attention_dim=ctx if isinstance(ctx, int) else ctx[-1]).eval()
    randomize(unet, seed)
    randomize(proj, seed + 100)
    unet.save_pretrained(os.path.join(folder, "decoder"))
    proj.save_pretrained(os.path.join(folder, "text_proj"))
    return unet, proj


def _decoder_reference(unet, proj, d, mask=True):
    """What UnCLIPPipeline computes between text_proj and the decoder (no guidance). mask=False:
    no attention mask (diffusers pads UnCLIP's mask for spatial keys that cross-only attention
    does not have, so UnCLIPPipeline cannot run it; every token is kept instead)."""
    import torch.nn.functional as F
    t = {k: torch.from_numpy(v) for k, v in d.items()}
    with torch.no_grad():
        context, emb_add = proj(image_embeddings=t["zi"], prompt_embeds=t["zt"],
                                text_encoder_hidden_states=t["hid"],
                                do_classifier_free_guidance=False)
        out = unet(t["x"].permute(0, 3, 1, 2), t["t"], encoder_hidden_states=context,
                   class_labels=emb_add,
                   attention_mask=F.pad(t["mask"], (4, 0), value=True) if mask else None)
    return out.sample.numpy().transpose(0, 2, 3, 1)


DECODER_VARIANTS = {
    "karlo": dict(),
    "resnet_time_scale_shift_default": dict(resnet_time_scale_shift="default"),
    "act_fn_gelu": dict(act_fn="gelu"),
    "act_fn_mish": dict(act_fn="mish"),
    "act_fn_swish": dict(act_fn="swish"),
    "resnet_skip_time_act": dict(resnet_skip_time_act=True),
    "center_input_sample": dict(center_input_sample=True),
    "mid_block_scale_factor": dict(mid_block_scale_factor=1.4),
    "resnet_out_scale_factor": dict(resnet_out_scale_factor=0.7),
    "only_cross_attention": dict(only_cross_attention=True),  # the middle block follows
    "only_cross_attention_per_block": dict(only_cross_attention=[False, True],
                                           mid_block_only_cross_attention=False),
    "mid_block_only_cross_attention": dict(mid_block_only_cross_attention=True),
    "cross_attention_norm_group": dict(cross_attention_norm="group_norm", cross_attention_dim=32),
    "cross_attention_norm_layer": dict(cross_attention_norm="layer_norm"),  # tokens as wide
    "time_embedding_act_fn": dict(time_embedding_act_fn="mish"),
    "timestep_post_act": dict(timestep_post_act="gelu"),
    "time_embedding_dim": dict(time_embedding_dim=24),
    "time_cond_proj_dim": dict(time_cond_proj_dim=7),  # only read with timestep_cond
    "time_embedding_type_fourier": dict(time_embedding_type="fourier", time_embedding_dim=24),
    "time_embedding_type_fourier_default_width": dict(time_embedding_type="fourier",
                                                      flip_sin_to_cos=False),
    "class_embed_type_none": dict(class_embed_type=None),
    "class_embed_type_projection": dict(class_embed_type="projection",
                                        projection_class_embeddings_input_dim=20),
    "class_embed_type_simple_projection": dict(class_embed_type="simple_projection",
                                               projection_class_embeddings_input_dim=12),
    "class_embeddings_concat": dict(class_embeddings_concat=True),
    "layers_per_block_per_block": dict(layers_per_block=[1, 2]),
    "attention_head_dim_per_block": dict(  # the up path reads the list unreversed
        attention_head_dim=[4, 8],
        down_block_types=("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2),
    "attention_head_dim_none": dict(  # one head as wide as the block
        attention_head_dim=[None, 4], down_block_types=("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2),
    "cross_attention_dim_per_block": dict(cross_attention_dim=[16, 16]),
    "block_out_channels_not_multiples": dict(block_out_channels=(8, 12), attention_head_dim=4),
    "three_levels": dict(block_out_channels=(8, 16, 24),
                         down_block_types=("ResnetDownsampleBlock2D",
                                           "SimpleCrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D",
                                         "ResnetUpsampleBlock2D")),
    "down_block_2d_up_block_2d": dict(
        down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"), resnet_skip_time_act=True,
        resnet_out_scale_factor=0.8),
    "downsample_padding_0": dict(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
                                 downsample_padding=0),
    "mid_block_type_unet_mid_block_2d": dict(mid_block_type="UNetMidBlock2D",
                                             mid_block_scale_factor=1.3,
                                             resnet_skip_time_act=True),
    "mid_block_type_none": dict(mid_block_type=None),
    "conv_kernels": dict(conv_in_kernel=5, conv_out_kernel=1),
    "encoder_hid_dim": dict(encoder_hid_dim=20),  # text_proj's tokens 20 wide, then 16
    "addition_embed_type_text": dict(addition_embed_type="text",
                                     addition_embed_type_num_heads=4),
    "addition_embed_type_text_wide_tokens": dict(
        addition_embed_type="text", addition_embed_type_num_heads=2, encoder_hid_dim=20,
        class_embed_type=None, time_embedding_act_fn="silu"),
    "attn_blocks_self_attention": dict(  # AttnDown/UpBlock2D ignore the tokens and the mask
        down_block_types=("AttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "AttnUpBlock2D"), norm_eps=1e-3,
        resnet_skip_time_act=True, resnet_out_scale_factor=1.1, attention_head_dim=4,
        mid_block_type="UNetMidBlock2D", cross_attention_norm="group_norm",
        cross_attention_dim=32),
    "attn_up_block_only": dict(
        down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
        up_block_types=("AttnUpBlock2D", "SimpleCrossAttnUpBlock2D")),
    "all_at_once": dict(
        block_out_channels=(8, 12), attention_head_dim=[4, 6], layers_per_block=[2, 1],
        down_block_types=("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=[True,
                                                                                        False],
        cross_attention_norm="group_norm", cross_attention_dim=32, mid_block_scale_factor=0.9,
        resnet_out_scale_factor=1.2, time_embedding_act_fn="silu", timestep_post_act="mish",
        class_embed_type="projection", projection_class_embeddings_input_dim=10,
        class_embeddings_concat=True, resnet_skip_time_act=True, conv_in_kernel=1),
}


@pytest.mark.parametrize("name", list(DECODER_VARIANTS))
def test_decoder_option_matches_diffusers(tmp_path, name):
    unet, proj = _decoder_folder(tmp_path, seed=len(name), **DECODER_VARIANTS[name])
    ours = load_decoder(tmp_path)
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    d = dict(x=f(2, 8, 8, 3), t=np.array([5, 901]), zi=f(2, CLIP), zt=f(2, CLIP),
             hid=f(2, 5, CLIP), mask=np.array([[True] * 5, [True] * 2 + [False] * 3]))
    c = unet.config
    cross_only = c.mid_block_only_cross_attention or np.any(c.only_cross_attention)
    if cross_only:
        d["mask"][:] = True
    ref = _decoder_reference(unet, proj, d, mask=not cross_only)
    out = np.asarray(ours(d["x"], d["t"], d["zi"], d["zt"], d["hid"], d["mask"]))
    assert out.shape == ref.shape == (2, 8, 8, 6)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_load_decoder_builds_at_the_folders_sample_size(tmp_path):
    _decoder_folder(tmp_path, 32)
    assert load_decoder(tmp_path).config.image_size == 32
    assert load_decoder(tmp_path, image_size=48).config.image_size == 48  # an override wins
    path = tmp_path / "decoder" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(dict(raw, sample_size=[32, 16])))
    with pytest.raises(CheckpointError, match=r"sample_size=\[32, 16\]"):
        load_decoder(tmp_path)


SUPER_RES = dict(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(8, 16),
                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                 down_block_types=("ResnetDownsampleBlock2D",) * 2,
                 up_block_types=("ResnetUpsampleBlock2D",) * 2)
SUPER_RES_VARIANTS = {
    "karlo": dict(),
    "resnet_time_scale_shift": dict(resnet_time_scale_shift="scale_shift"),
    "act_fn_relu": dict(act_fn="relu"),  # the resnets only: UNet2DModel's outer SiLU stays
    "act_fn_mish": dict(act_fn="mish"),
    "center_input_sample": dict(center_input_sample=True),
    "add_attention": dict(add_attention=True, attention_head_dim=4),
    "add_attention_one_head": dict(add_attention=True, attention_head_dim=None,
                                   attn_norm_num_groups=4, resnet_time_scale_shift="scale_shift"),
    "learned_variance_wide_time": dict(out_channels=6, time_embedding_dim=24, norm_eps=1e-6,
                                       flip_sin_to_cos=False, freq_shift=1),
    "attention_without_group_norm": dict(add_attention=True, attention_head_dim=4,
                                         resnet_time_scale_shift="scale_shift"),
    "mid_block_scale_factor": dict(add_attention=True, attention_head_dim=4,
                                   mid_block_scale_factor=1.5),
    "mid_block_type_none": dict(mid_block_type=None),
    "block_out_channels_not_multiples": dict(block_out_channels=(8, 12)),
    "down_block_2d_up_block_2d": dict(down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D"),
                                      up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D")),
    "downsample_padding_0": dict(down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, downsample_padding=0),
    "attn_blocks": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4),
    "attn_blocks_resnet_resample_one_head": dict(
        down_block_types=("AttnDownBlock2D",) * 2, up_block_types=("AttnUpBlock2D",) * 2,
        downsample_type="resnet", upsample_type="resnet", attention_head_dim=None,
        attn_norm_num_groups=4, add_attention=True),
    "attn_up_only": dict(up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                         attention_head_dim=8),
    "attn_norm_num_groups_other": dict(add_attention=True, attention_head_dim=4,
                                       attn_norm_num_groups=2),
    "attention_blocks_normed_middle_not": dict(
        add_attention=True, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "time_embedding_type_learned": dict(time_embedding_type="learned", num_train_timesteps=1000),
}


@pytest.mark.parametrize("name", list(SUPER_RES_VARIANTS))
def test_super_res_option_matches_diffusers(tmp_path, name):
    from diffusers import UNet2DModel
    config = {**SUPER_RES, **SUPER_RES_VARIANTS[name]}
    ref_model = UNet2DModel(**config).eval()
    randomize(ref_model, len(name))
    ref_model.save_pretrained(tmp_path)
    ours = load_super_res(tmp_path)
    rng = np.random.default_rng(0)
    x_t, low = (rng.standard_normal((2, 8, 8, 3)).astype(np.float32) for _ in range(2))
    t = np.array([3, 811])
    with torch.no_grad():
        nchw = torch.from_numpy(np.concatenate([x_t, low], -1).transpose(0, 3, 1, 2).copy())
        ref = ref_model(nchw, torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(ours(x_t, t, low))
    assert out.shape == ref.shape == (2, 8, 8, config["out_channels"])
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_unknown_unet_activation_is_refused(tmp_path):
    _decoder_folder(tmp_path)
    path = tmp_path / "decoder" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), act_fn="tanh")))
    with pytest.raises(CheckpointError, match="act_fn='tanh'"):
        load_decoder(tmp_path)


def _config_only_folder(folder, decoder=None, text_proj=None):
    """decoder/ and text_proj/ with config.json only: refusals come before any weight is read."""
    unet = {**DECODER, "_class_name": "UNet2DConditionModel", "sample_size": 8, **(decoder or {})}
    proj = {"_class_name": "UnCLIPTextProjModel", "clip_extra_context_tokens": 4,
            "clip_embeddings_dim": CLIP, "time_embed_dim": 32, "cross_attention_dim": 16,
            **(text_proj or {})}
    for sub, config in (("decoder", unet), ("text_proj", proj)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(config, f)


CROSS_ATTN = dict(down_block_types=("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))
# (decoder config changes, text_proj changes, what the one-line message must name)
DECODER_REFUSALS = {
    "cross_attn_down_block": (CROSS_ATTN, {}, "'CrossAttnDownBlock2D' is not supported"),
    "cross_attn_up_block": (dict(up_block_types=("CrossAttnUpBlock2D",
                                                 "ResnetUpsampleBlock2D")), {},
                            "'CrossAttnUpBlock2D' is not supported"),
    "k_down_block": (dict(down_block_types=("KDownBlock2D", "ResnetDownsampleBlock2D")), {},
                     "'KDownBlock2D' is not supported"),
    "block_types_count": (dict(down_block_types=("ResnetDownsampleBlock2D",)), {},
                          "down_block_types=['ResnetDownsampleBlock2D']"),
    "mid_block_cross_attn": (dict(mid_block_type="UNetMidBlock2DCrossAttn"), {},
                             "mid_block_type='UNetMidBlock2DCrossAttn'"),
    "class_embed_type_timestep": (dict(class_embed_type="timestep"), {},
                                  "class_embed_type='timestep'"),
    "class_embed_type_list": (dict(class_embed_type=["identity"]), {}, "class_embed_type=["),
    "num_class_embeds": (dict(class_embed_type=None, num_class_embeds=10), {},
                         "num_class_embeds=10"),
    "projection_without_input_dim": (dict(class_embed_type="projection"), {},
                                     "projection_class_embeddings_input_dim=None"),
    "class_embeddings_concat_without_class": (dict(class_embed_type=None,
                                                   class_embeddings_concat=True), {},
                                              "class_embeddings_concat=True"),
    "text_proj_time_embed_dim": ({}, dict(time_embed_dim=48), "time_embed_dim 48"),
    "text_proj_cross_attention_dim": ({}, dict(cross_attention_dim=24),
                                      "cross_attention_dim 24"),
    "num_attention_heads": (dict(num_attention_heads=2), {}, "num_attention_heads=2"),
    "time_embedding_type_learned": (dict(time_embedding_type="learned"), {},
                                    "time_embedding_type='learned'"),
    "fourier_odd_width": (dict(time_embedding_type="fourier", time_embedding_dim=33), {},
                          "time_embedding_dim=33"),
    "conv_in_kernel_even": (dict(conv_in_kernel=4), {}, "conv_in_kernel=4"),
    "conv_out_kernel_zero": (dict(conv_out_kernel=0), {}, "conv_out_kernel=0"),
    "encoder_hid_dim_type": (dict(encoder_hid_dim=12, encoder_hid_dim_type="image_proj"), {},
                             "encoder_hid_dim_type='image_proj'"),
    "encoder_hid_dim_missing": (dict(encoder_hid_dim_type="text_proj"), {},
                                "encoder_hid_dim=None"),
    "encoder_hid_dim_text_proj_width": (dict(encoder_hid_dim=12), {},
                                        "cross_attention_dim 16"),
    "addition_embed_type": (dict(addition_embed_type="image"), {},
                            "addition_embed_type='image'"),
    "addition_embed_type_heads": (dict(addition_embed_type="text"), {},
                                  "addition_embed_type_num_heads=64"),
    "attention_type_gated": (dict(attention_type="gated"), {}, "attention_type='gated'"),
    "cross_attention_norm_unknown": (dict(cross_attention_norm="batch_norm"), {},
                                     "cross_attention_norm='batch_norm'"),
    "cross_attention_norm_layer_widths": (dict(cross_attention_norm="layer_norm",
                                               cross_attention_dim=32), dict(
        cross_attention_dim=32), "cross_attention_norm='layer_norm'"),
    "cross_attention_norm_group_width": (dict(cross_attention_norm="group_norm"), {},
                                         "cross_attention_norm='group_norm'"),
    "cross_attention_dim_disagree": (dict(cross_attention_dim=[24, 16], down_block_types=(
        "SimpleCrossAttnDownBlock2D",) * 2, up_block_types=("SimpleCrossAttnUpBlock2D",) * 2),
        {}, "cross_attention_dim=[24, 16]"),
    "attention_head_dim_mid_none": (dict(attention_head_dim=[8, None]), {},
                                    "attention_head_dim=[8, None]"),
    "attention_head_dim_not_dividing": (dict(attention_head_dim=6), {}, "head_dim (6)"),
    "layers_per_block_length": (dict(layers_per_block=[1]), {}, "layers_per_block=[1]"),
    "layers_per_block_zero": (dict(layers_per_block=0), {}, "layers_per_block=0"),
    "only_cross_attention_length": (dict(only_cross_attention=[True]), {},
                                    "only_cross_attention=[True]"),
    "block_out_channels_groups": (dict(block_out_channels=(8, 10)), {},
                                  "block_out_channels=[8, 10]"),
    "block_out_channels_text": (dict(block_out_channels="8,16"), {},
                                "block_out_channels='8,16'"),
    "norm_num_groups_none": (dict(norm_num_groups=None), {}, "norm_num_groups=None"),
    "resnet_time_scale_shift_spatial": (dict(resnet_time_scale_shift="spatial"), {},
                                        "resnet_time_scale_shift='spatial'"),
    "act_fn": (dict(act_fn="tanh"), {}, "act_fn='tanh'"),
    "time_embedding_act_fn": (dict(time_embedding_act_fn="tanh"), {},
                              "time_embedding_act_fn='tanh'"),
    "timestep_post_act": (dict(timestep_post_act="softplus"), {}, "timestep_post_act='softplus'"),
    "mid_block_scale_factor_zero": (dict(mid_block_scale_factor=0), {},
                                    "mid_block_scale_factor=0"),
    "resnet_out_scale_factor_text": (dict(resnet_out_scale_factor="2"), {},
                                     "resnet_out_scale_factor='2'"),
    "downsample_padding": (dict(down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D"),
                                downsample_padding=2), {}, "downsample_padding=2"),
    "dropout": (dict(dropout=1.5), {}, "dropout=1.5"),
    "center_input_sample": (dict(center_input_sample="yes"), {}, "center_input_sample='yes'"),
    "in_channels": (dict(in_channels=0), {}, "in_channels=0"),
    "clip_embeddings_dim": ({}, dict(clip_embeddings_dim="768"), "clip_embeddings_dim='768'"),
}


@pytest.mark.parametrize("name", list(DECODER_REFUSALS))
def test_decoder_options_are_converted_or_refused_naming_them(tmp_path, name):
    decoder, proj, says = DECODER_REFUSALS[name]
    _config_only_folder(tmp_path, decoder, proj)
    with pytest.raises(CheckpointError) as err:
        load_decoder(tmp_path)
    message = str(err.value)
    assert says in message and "\n" not in message, message


SUPER_RES_REFUSALS = {
    "skip_down_block": (dict(down_block_types=("SkipDownBlock2D", "ResnetDownsampleBlock2D")),
                        "'SkipDownBlock2D' is not supported"),
    "time_embedding_type_fourier": (dict(time_embedding_type="fourier"),
                                    "time_embedding_type='fourier'"),
    "time_embedding_type_learned_no_steps": (dict(time_embedding_type="learned"),
                                             "num_train_timesteps=None"),
    "class_embed_type": (dict(class_embed_type="identity"), "class_embed_type='identity'"),
    "num_class_embeds": (dict(num_class_embeds=3), "num_class_embeds=3"),
    "attn_norm_num_groups": (dict(add_attention=True, attention_head_dim=4,
                                  attn_norm_num_groups=3), "attn_norm_num_groups=3"),
    "downsample_type": (dict(down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D"),
                             attention_head_dim=4, downsample_type="pool"),
                        "downsample_type='pool'"),
    "in_channels_odd": (dict(in_channels=5), "in_channels=5"),
    "norm_num_groups_none": (dict(norm_num_groups=None), "norm_num_groups=None"),
    "mid_block_scale_factor_inf": (dict(mid_block_scale_factor=float("inf")),
                                   "mid_block_scale_factor=inf"),
    "layers_per_block_list": (dict(layers_per_block=[1, 1]), "layers_per_block=[1, 1]"),
    "attention_head_dim_text": (dict(add_attention=True, attention_head_dim="4"),
                                "attention_head_dim='4'"),
}


@pytest.mark.parametrize("name", list(SUPER_RES_REFUSALS))
def test_super_res_options_are_converted_or_refused_naming_them(tmp_path, name):
    config, says = SUPER_RES_REFUSALS[name]
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**SUPER_RES, "_class_name": "UNet2DModel", **config}, f)
    with pytest.raises(CheckpointError) as err:
        load_super_res(tmp_path)
    message = str(err.value)
    assert says in message and "\n" not in message, message


def test_config_json_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_super_res(tmp_path)
