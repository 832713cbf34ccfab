"""The decoder: parity with diffusers' UnCLIPTextProjModel + UNet2DConditionModel (Karlo's
decoder layout) on random weights, guidance inputs, and the paper-size parameter count."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pipeline_fixtures import materialise
from torch_reference import randomize
from unclip_jax.convert.diffusers_unet import load_decoder
from unclip_jax.models.decoder import Decoder, DecoderConfig, abstract_decoder, guided_decoder_fn
from unclip_jax.models.upsampler import count_params
from unclip_jax.torch_weights import CheckpointError, CheckpointMismatchError

CLIP_DIM = 20


def karlo_pipeline_folder(folder, seed, **kw):
    """A diffusers UnCLIPPipeline-like folder: decoder/ and text_proj/."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    unet = UNet2DConditionModel(in_channels=3, out_channels=6, sample_size=16,
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                class_embed_type="identity",
                                resnet_time_scale_shift="scale_shift", **kw).eval()
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM,
                               time_embed_dim=4 * kw["block_out_channels"][0],
                               cross_attention_dim=kw["cross_attention_dim"]).eval()
    randomize(unet, seed)
    randomize(proj, seed + 100)
    unet.save_pretrained(os.path.join(folder, "decoder"))
    proj.save_pretrained(os.path.join(folder, "text_proj"))
    return unet, proj


CONFIGS = {
    "two_levels_one_attn": dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16,
        cross_attention_dim=24, norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "three_levels_two_attn": dict(
        block_out_channels=(16, 32, 48), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=40, norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "ResnetUpsampleBlock2D")),
}


def _inputs(seed=0, b=2, length=7):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((b, 16, 16, 3)).astype(np.float32),
        t=np.array([5, 901])[:b],
        zi=rng.standard_normal((b, CLIP_DIM)).astype(np.float32),
        zt=rng.standard_normal((b, CLIP_DIM)).astype(np.float32),
        hid=rng.standard_normal((b, length, CLIP_DIM)).astype(np.float32),
        mask=np.array([[True] * length, [True] * 3 + [False] * (length - 3)])[:b])


def _reference(unet, proj, d):
    """What diffusers' UnCLIPPipeline computes between text_proj and the decoder (no guidance)."""
    import torch.nn.functional as F
    with torch.no_grad():
        context, emb_add = proj(image_embeddings=torch.from_numpy(d["zi"]),
                                prompt_embeds=torch.from_numpy(d["zt"]),
                                text_encoder_hidden_states=torch.from_numpy(d["hid"]),
                                do_classifier_free_guidance=False)
        mask = F.pad(torch.from_numpy(d["mask"]), (4, 0), value=True)
        out = unet(torch.from_numpy(d["x"].transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(d["t"]), encoder_hidden_states=context,
                   class_labels=emb_add, attention_mask=mask).sample
    return out.numpy().transpose(0, 2, 3, 1)


_COMPILED = {}


def _ours(model, d, drop_image=None, drop_text=None):
    """model(x, t, z_i, z_t, hidden, mask, drop_image=, drop_text=), jitted once per model
    with XLA's cheapest backend optimisation (compiling dominates these tests on CPU, and an
    eager call compiles every op); absent drop flags are all False, which changes nothing."""
    graphdef, state = nnx.split(model)
    b = d["x"].shape[0]
    args = [jnp.asarray(d[k]) for k in ("x", "t", "zi", "zt", "hid", "mask")]
    drops = [jnp.zeros(b, bool) if f is None else jnp.asarray(f) for f in (drop_image, drop_text)]

    def run(state, args, drops):
        return nnx.merge(graphdef, state)(*args, drop_image=drops[0], drop_text=drops[1])

    key = (id(model), tuple(a.shape for a in args))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(run).lower(state, args, drops).compile(
            {"xla_backend_optimization_level": 0})
    return np.asarray(_COMPILED[key](state, args, drops))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers_unclip_decoder(tmp_path, name):
    unet, proj = karlo_pipeline_folder(tmp_path, seed=len(name), **CONFIGS[name])
    ours = load_decoder(tmp_path)
    assert isinstance(ours, Decoder) and ours.config.text_encoder == "clip"
    d = _inputs()
    ref = _reference(unet, proj, d)
    out = _ours(ours, d)
    assert out.shape == ref.shape == (2, 16, 16, 6)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"{name}: |ref| mean {np.abs(ref).mean():.3f}, relative error {rel:.2e}")
    assert rel < 1e-4
    # The text mask is honoured: unmasking the padded tokens of row 1 changes row 1 only.
    unmasked = _ours(ours, dict(d, mask=np.ones_like(d["mask"])))
    assert np.allclose(unmasked[0], out[0], atol=1e-6)
    assert np.abs(unmasked[1] - out[1]).max() > 1e-4


def test_drop_flags_and_guidance(tmp_path):
    unet, proj = karlo_pipeline_folder(tmp_path, seed=3, **CONFIGS["two_levels_one_attn"])
    ours = load_decoder(tmp_path)
    d = _inputs()
    # drop_image == feeding the learned null embedding as z_i (what text_proj does for CFG).
    null = np.asarray(ours.null_image_embed[...])
    dropped = _ours(ours, d, drop_image=jnp.array([True, False]))
    assert np.allclose(dropped[0], _ours(ours, dict(d, zi=np.stack([null, d["zi"][1]])))[0],
                       atol=1e-5)
    assert np.allclose(dropped[1], _ours(ours, d)[1], atol=1e-5)
    # drop_text == z_t zeroed and every text token masked out.
    text_dropped = _ours(ours, d, drop_text=jnp.array([True, True]))
    manual = _ours(ours, dict(d, zt=np.zeros_like(d["zt"]), mask=np.zeros_like(d["mask"])))
    assert np.allclose(text_dropped, manual, atol=1e-5)
    # Guidance (one doubled batch): scale s mixes cond and uncond epsilon; variance is cond's.
    graphdef, state = nnx.split(ours)

    @jax.jit
    def guided_fn(state, x, t, zi, zt, hid, mask):
        model = nnx.merge(graphdef, state)
        return guided_decoder_fn(model, zi, zt, hid, mask, guidance_scale=4.0)(x, t)

    guided = np.asarray(guided_fn(state, *(jnp.asarray(d[k]) for k in
                                           ("x", "t", "zi", "zt", "hid", "mask"))))
    cond = _ours(ours, d)
    uncond = _ours(ours, d, drop_image=jnp.ones(2, bool), drop_text=jnp.ones(2, bool))
    assert np.allclose(guided[..., :3], uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3]),
                       atol=1e-4)
    assert np.allclose(guided[..., 3:], cond[..., 3:], atol=1e-5)

    # Guided sampling through the diffusion core: 4 DDIM steps in one lax.scan.
    from unclip_jax import diffusion
    schedule = diffusion.respace(diffusion.get_schedule("cosine", 1000),
                                 diffusion.space_timesteps(1000, "ddim4"))

    @jax.jit
    def sample(state, x_T, zi, zt, hid, mask):
        fn = guided_decoder_fn(nnx.merge(graphdef, state), zi, zt, hid, mask, guidance_scale=3.0)
        return diffusion.ddim_sample(fn, schedule, x_T, clip="static")

    images = np.asarray(sample(state, *(jnp.asarray(d[k]) for k in
                                        ("x", "zi", "zt", "hid", "mask"))))
    assert images.shape == (2, 16, 16, 3) and np.all(np.abs(images) <= 1.0 + 1e-5)
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_loader_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_decoder(tmp_path / "absent")
    (tmp_path / "decoder").mkdir()
    with pytest.raises(CheckpointError, match="text_proj/"):
        load_decoder(tmp_path)
    folder = tmp_path / "pipe"
    karlo_pipeline_folder(folder, 0, **CONFIGS["two_levels_one_attn"])
    config_file = folder / "decoder" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, class_embed_type="timestep")))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        load_decoder(folder)
    config_file.write_text(json.dumps(dict(config, cross_attention_dim=32)))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_decoder(folder)
    config_file.write_text(json.dumps(dict(config, layers_per_block=2)))
    with pytest.raises(CheckpointMismatchError, match="missing tensors"):
        load_decoder(folder)


def test_text_encoder_variants_trace():
    """'none' and 'transformer' text encoders build and map inputs to [B, H, W, 6] (traced with
    nnx.eval_shape: shapes only, nothing compiled)."""
    base = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                head_dim=8, groups=4, clip_dim=12, context_dim=16, image_size=8)
    x, t, zi = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2]), jnp.ones((2, 12))

    def run(cfg, *args, **kw):
        return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))(*args, **kw))

    none = DecoderConfig(**base, text_encoder="none", use_text_embed=False)
    assert run(none, x, t, zi).shape == (2, 8, 8, 6)
    xf = DecoderConfig(**base, text_encoder="transformer", xf_width=16, xf_layers=1, xf_heads=2,
                       xf_ctx=6, xf_vocab=50)
    tokens = jnp.array([[1, 5, 49, 0, 0, 0], [1, 49, 0, 0, 0, 0]])
    assert run(xf, x, t, zi, jnp.ones((2, 12)), text_tokens=tokens,
               text_mask=tokens > 0).shape == (2, 8, 8, 6)
    with pytest.raises(ValueError, match="text_tokens"):
        run(xf, x, t, zi, jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="text_hidden"):
        run(DecoderConfig(**base), x, t, zi, jnp.ones((2, 12)))


def test_paper_size_parameter_count():
    """Table 3: decoder 3.5B (512 / 3 / 1,2,3,4, heads of 64 at 32,16,8, text Transformer
    2048 wide x 24 layers); counted with nnx.eval_shape, nothing allocated."""
    from unclip_jax.config import load_file
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for size, paper in (("paper", 3.5e9), ("karlo", None)):
        cfg = load_file(os.path.join(repo, "configs", "decoder.py") + f":size={size}")
        n = count_params(abstract_decoder(DecoderConfig(**cfg.model.to_dict())))
        if paper:
            print(f"decoder {size}: {n / 1e9:.2f}B parameters (paper Table 3: 3.5B, "
                  f"{100 * (n / paper - 1):+.1f}%)")
            assert abs(n / paper - 1) < 0.15
        else:
            print(f"decoder {size}: {n / 1e9:.2f}B parameters")


def _layout_matches(abstract, table, torch_state):
    """Every parameter maps to a tensor of the right shape and every tensor is used."""
    from unclip_jax.torch_weights import theirs_shape
    ours = {}
    for path, var in nnx.state(abstract, nnx.Param).flat_state():
        name, kind = table[path]
        ours[name] = theirs_shape(var.shape, kind)
    theirs = {k: tuple(v.shape) for k, v in torch_state.items()}
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    return sum(int(np.prod(s)) for s in theirs.values())


def test_full_size_karlo_decoder_layout():
    """Karlo's real decoder config (diffusers' conversion script), built on torch's meta device
    (no memory): our name table covers its every tensor with the right shape."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from unclip_jax.convert.diffusers_unet import (decoder_config_from_diffusers,
                                                   text_proj_param_map, unet_param_map)
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", in_channels=3, out_channels=6,
            cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
            resnet_time_scale_shift="scale_shift")
        proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=768,
                                   time_embed_dim=1280, cross_attention_dim=1536)
    config = decoder_config_from_diffusers(dict(unet.config), dict(proj.config))
    abstract = abstract_decoder(config)
    table = {k: (f"decoder.{n}", kind) for k, (n, kind) in
             unet_param_map(config.unet_config()).items()}
    table.update({k: (f"text_proj.{n}", kind) for k, (n, kind) in
                  text_proj_param_map(config).items()})
    state = {f"decoder.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"text_proj.{k}": v for k, v in proj.state_dict().items()})
    n = _layout_matches(abstract, table, state)
    assert n == count_params(abstract)
    print(f"Karlo decoder layout: {len(state)} tensors, {n / 1e9:.3f}B parameters, all mapped")


def test_variant_configs_round_trip_through_a_pipeline_manifest():
    """Converted variants (tuples per level, new fields) survive the JSON of our folders."""
    from unclip_jax.io.pipeline_folder import config_from_dict, config_to_dict
    from unclip_jax.models.upsampler import SuperResConfig
    decoder = DecoderConfig(
        image_size=8, channels=8, channel_mult=(1, 1), block_widths=(8, 12),
        num_res_blocks=(1, 2), mid_attention=False, attention_levels=(0, 1),
        up_attention_levels=(1,), self_attn_levels=(0,),
        self_attn_eps=1e-3, head_dim=(4, 6), up_head_dim=(8, 4), groups=4, clip_dim=12,
        context_dim=16, token_dim=20, token_pool_heads=2, cross_only=(False, True),
        context_norm="group", context_norm_groups=4, resblock_updown=(False, True),
        up_resblock_updown=(True, False), out_scale=(1.0, 0.5), mid_blocks=1, emb_concat=True,
        cond_to_time="mlp", cond_time_dim=10, time_proj="fourier", conv_in_kernel=5)
    super_res = SuperResConfig(channels=8, channel_mult=(1, 1), block_widths=(8, 12), groups=4,
                               attention_levels=(1,), head_dim=4, mid_blocks=0,
                               mid_attn_norm=False, time_proj="learned", num_timesteps=9,
                               resblock_updown=(False, True), conv_down_padding=0)
    for cls, config in (("Decoder", decoder), ("SuperRes", super_res)):
        stored = json.loads(json.dumps(config_to_dict(config)))
        assert config_from_dict(cls, stored, "test") == config
    # and the decoder builds and runs
    out = nnx.eval_shape(lambda: Decoder(decoder, nnx.Rngs(0))(
        jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), jnp.zeros((2, 12)), jnp.zeros((2, 12)),
        jnp.zeros((2, 3, 12)), jnp.ones((2, 3), bool)))
    assert out.shape == (2, 8, 8, 6)


def test_drop_tokens_removes_the_caption_tokens_alone():
    """drop_tokens (the "without caption tokens" ablation) masks the caption's tokens out of the
    context (a 'transformer' encoder: its pooled state zeroed too) and keeps z_t: for a CLIP-
    states decoder it equals an all-false text_mask; drop_text also zeroes z_t."""
    base = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                head_dim=8, groups=4, clip_dim=12, context_dim=16, image_size=8, text_width=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    t, zi = jnp.array([1, 500]), jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    zt = jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    yes = jnp.ones((2,), bool)
    dec = materialise(lambda: Decoder(DecoderConfig(**base), nnx.Rngs(0)), 0)
    dropped = dec(x, t, zi, zt, hidden, mask, drop_tokens=yes)
    np.testing.assert_allclose(dropped, dec(x, t, zi, zt, hidden, jnp.zeros_like(mask)),
                               atol=1e-6)
    assert np.abs(dropped - dec(x, t, zi, zt, hidden, mask)).max() > 1e-4
    assert np.abs(dropped - dec(x, t, zi, zt, hidden, mask, drop_text=yes)).max() > 1e-4
    xf = materialise(lambda: Decoder(DecoderConfig(**dict(
        base, text_encoder="transformer", use_text_embed=False, xf_width=16, xf_layers=1,
        xf_heads=2, xf_ctx=6, xf_vocab=50)), nnx.Rngs(0)), 1)
    tokens = jnp.array([[1, 5, 49, 0, 0, 0], [1, 7, 8, 9, 49, 0]])
    other = jnp.array([[1, 6, 49, 0, 0, 0], [1, 3, 2, 4, 49, 0]])
    a = xf(x, t, zi, text_tokens=tokens, text_mask=mask, drop_tokens=yes)
    np.testing.assert_array_equal(a, xf(x, t, zi, text_tokens=other, text_mask=mask,
                                        drop_tokens=yes))
    np.testing.assert_array_equal(a, xf(x, t, zi, text_tokens=tokens, text_mask=mask,
                                        drop_text=yes))
    assert np.abs(a - xf(x, t, zi, text_tokens=tokens, text_mask=mask)).max() > 1e-4
