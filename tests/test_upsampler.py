"""The super-resolution UNet: parity with diffusers' UNet2DModel (Karlo's super_res layout) on
random weights, the loader's refusals, and the paper-size parameter counts."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from torch_reference import randomize
from unclip_jax.convert.diffusers_unet import load_super_res
from unclip_jax.models.upsampler import (SuperRes, SuperResConfig, abstract_super_res,
                                         count_params, resize_low_res)
from unclip_jax.torch_weights import CheckpointError, CheckpointMismatchError


def karlo_super_res(folder, seed, **kw):
    from diffusers import UNet2DModel
    n = len(kw["block_out_channels"])
    model = UNet2DModel(in_channels=6, sample_size=16, add_attention=False,
                        down_block_types=("ResnetDownsampleBlock2D",) * n,
                        up_block_types=("ResnetUpsampleBlock2D",) * n, **kw).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


# Karlo's own super_res_first has resnet_time_scale_shift "default" and 3 output channels; the
# paper-style model has scale-shift norm and 6 (learned variance). Both layouts are checked.
CONFIGS = {
    "scale_shift_learned_variance": dict(
        block_out_channels=(32, 64), layers_per_block=1, resnet_time_scale_shift="scale_shift",
        out_channels=6, norm_num_groups=8),
    "karlo_default_eps": dict(
        block_out_channels=(16, 32, 48), layers_per_block=2, resnet_time_scale_shift="default",
        out_channels=3, norm_num_groups=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers_unet2dmodel(tmp_path, name):
    ref_model = karlo_super_res(tmp_path, seed=len(name), **CONFIGS[name])
    ours = load_super_res(tmp_path)
    assert isinstance(ours, SuperRes)
    assert ours.config.out_channels == CONFIGS[name]["out_channels"]

    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    low = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    t = np.array([3, 811])
    with torch.no_grad():
        nchw = torch.from_numpy(np.concatenate([x_t, low], -1).transpose(0, 3, 1, 2).copy())
        ref = ref_model(nchw, torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    # One compile with XLA's cheapest backend optimisation (eager calls compile every op).
    graphdef, state = nnx.split(ours)
    args = (state, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(low))
    run = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(*args).compile(
        {"xla_backend_optimization_level": 0})
    out = np.asarray(run(*args))
    assert out.shape == ref.shape
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"{name}: |ref| mean {np.abs(ref).mean():.3f}, relative error {rel:.2e}")
    assert rel < 1e-4
    # The conditioning image matters (the test would pass trivially if it were ignored).
    other = np.asarray(run(*args[:3], args[3] * 0))
    assert np.linalg.norm(other - ref) / np.linalg.norm(ref) > 1e-2


def test_loader_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_super_res(tmp_path / "absent")
    karlo_super_res(tmp_path, 0, block_out_channels=(16, 32), layers_per_block=1,
                    out_channels=3, norm_num_groups=4)
    config = json.loads((tmp_path / "config.json").read_text())
    # An option outside the super-res layout: named in one clear error.
    (tmp_path / "config.json").write_text(json.dumps(dict(
        config, down_block_types=["SkipDownBlock2D", "ResnetDownsampleBlock2D"])))
    with pytest.raises(CheckpointError, match="'SkipDownBlock2D' is not supported"):
        load_super_res(tmp_path)
    # A config whose middle attention these weights lack: the missing tensors are named.
    (tmp_path / "config.json").write_text(json.dumps(dict(config, add_attention=True)))
    with pytest.raises(CheckpointMismatchError, match="mid_block.attentions.0.to_q.weight"):
        load_super_res(tmp_path)
    # A config that does not belong to the weights: every misshapen tensor listed.
    (tmp_path / "config.json").write_text(json.dumps(dict(config, layers_per_block=2)))
    with pytest.raises(CheckpointMismatchError, match="missing tensors"):
        load_super_res(tmp_path)


def test_resize_low_res_matches_torch_bicubic():
    """The conditioning resize is torch's antialiased bicubic, as diffusers' UnCLIPPipeline
    upsamples (``F.interpolate(..., mode='bicubic', antialias=True)``)."""
    rng = np.random.default_rng(0)
    for shape, size in [((2, 16, 16, 3), 64), ((5, 12, 3), (20, 48))]:
        low = rng.uniform(-1, 1, shape).astype(np.float32)
        out = np.asarray(resize_low_res(low, size))
        t = torch.from_numpy(low if low.ndim == 4 else low[None]).permute(0, 3, 1, 2)
        hw = (size, size) if isinstance(size, int) else size
        ref = torch.nn.functional.interpolate(t, size=hw, mode="bicubic", align_corners=False,
                                              antialias=True)
        ref = ref.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(out, ref if low.ndim == 4 else ref[0], atol=1e-5)
    clipped = np.asarray(resize_low_res(np.sign(low), 64, clip=True))
    assert clipped.min() >= -1 and clipped.max() <= 1


def test_resize_low_res_and_shape_errors():
    config = SuperResConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, groups=4)
    low = jnp.ones((1, 8, 8, 3)) * 0.5
    up = resize_low_res(low, 16)
    assert up.shape == (1, 16, 16, 3) and np.allclose(up, 0.5, atol=1e-5)

    def run(x_t, low_res):  # traced only (shapes), nothing compiled
        return nnx.eval_shape(lambda: SuperRes(config, nnx.Rngs(0))(
            x_t, jnp.zeros((x_t.shape[0],), jnp.int32), low_res))

    with pytest.raises(ValueError, match="target size"):
        run(jnp.zeros((1, 16, 16, 3)), low)
    # Fully convolutional: any size divisible by 2 ** (levels - 1) runs.
    assert run(jnp.zeros((1, 12, 20, 3)), jnp.zeros((1, 12, 20, 3))).shape == (1, 12, 20, 3)


def test_paper_sizes_parameter_counts():
    """Table 3: SR 64->256 700M (320 / 3 / 1,2,3,4), SR 256->1024 300M (192 / 2 / 1,1,2,2,4,4);
    counted with nnx.eval_shape, nothing allocated."""
    from unclip_jax.config import load_file
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for size, paper in (("paper_256", 700e6), ("paper_1024", 300e6), ("karlo", None)):
        cfg = load_file(os.path.join(repo, "configs", "upsampler.py") + f":size={size}")
        model_config = SuperResConfig(**cfg.model.to_dict())
        n = count_params(abstract_super_res(model_config))
        if paper:
            print(f"{size}: {n / 1e6:.0f}M parameters (paper Table 3: {paper / 1e6:.0f}M, "
                  f"{100 * (n / paper - 1):+.1f}%)")
            assert abs(n / paper - 1) < 0.15
        else:
            print(f"{size}: {n / 1e6:.0f}M parameters")


def test_full_size_karlo_super_res_layout():
    """Karlo's real super_res_first config (diffusers' conversion script), built on torch's meta
    device (no memory): our name table covers its every tensor with the right shape."""
    from diffusers import UNet2DModel
    from unclip_jax.convert.diffusers_unet import super_res_config_from_diffusers, unet_param_map
    from unclip_jax.torch_weights import theirs_shape
    with torch.device("meta"):
        ref = UNet2DModel(sample_size=256, layers_per_block=3, in_channels=6, out_channels=3,
                          block_out_channels=(320, 640, 960, 1280), add_attention=False,
                          down_block_types=("ResnetDownsampleBlock2D",) * 4,
                          up_block_types=("ResnetUpsampleBlock2D",) * 4)
    config = super_res_config_from_diffusers(dict(ref.config))
    abstract = abstract_super_res(config)
    table = unet_param_map(config.unet_config())
    ours = {table[p][0]: theirs_shape(v.shape, table[p][1])
            for p, v in nnx.state(abstract, nnx.Param).flat_state()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    print(f"Karlo super-res layout: {len(theirs)} tensors, "
          f"{count_params(abstract) / 1e6:.0f}M parameters, all mapped")
