"""The diffusion prior module: parity with diffusers' PriorTransformer, loading, normalisation."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from torch_reference import KARLO_LIKE_PRIOR, random_prior
from unclip_jax.convert.diffusers_prior import load_prior
from unclip_jax.models.diffusion_prior import (DiffusionPrior, PriorConfig, TextConditioning,
                                               count_params, get_preset)
from unclip_jax.torch_weights import CheckpointError, CheckpointMismatchError

KARLO_LIKE = KARLO_LIKE_PRIOR
LAYER_NORMED = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                    num_embeddings=6, additional_embeddings=3, norm_in_type="layer",
                    embedding_proj_norm_type="layer", added_emb_type=None,
                    time_embed_act_fn="gelu", embedding_proj_dim=10, time_embed_dim=20)


def _inputs(batch, length, width, cond_dim, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), bool)
    for row, n in enumerate([length, 3, 1][:batch]):
        mask[row, :n] = True  # row 0 full, rows 1-2 padded
    return dict(x=rng.standard_normal((batch, width)).astype(np.float32),
                t=np.array([0, 437, 999][:batch]),
                text_embed=rng.standard_normal((batch, cond_dim)).astype(np.float32),
                text_hidden=rng.standard_normal((batch, length, width)).astype(np.float32),
                mask=mask)


@pytest.mark.parametrize("config", [KARLO_LIKE, LAYER_NORMED], ids=["karlo_like", "layer_norms"])
def test_parity_with_diffusers_prior_transformer(tmp_path, config):
    ref_model = random_prior(**config)
    ref_model.save_pretrained(tmp_path)
    ours = load_prior(tmp_path)
    d = config["embedding_dim"]
    a = _inputs(3, config["num_embeddings"], d, config.get("embedding_proj_dim") or d)
    with torch.no_grad():
        ref = ref_model(hidden_states=torch.tensor(a["x"]), timestep=torch.tensor(a["t"]),
                        proj_embedding=torch.tensor(a["text_embed"]),
                        encoder_hidden_states=torch.tensor(a["text_hidden"]),
                        attention_mask=torch.tensor(a["mask"])).predicted_image_embedding
    ref = ref.numpy().reshape(3, d)  # [B, 1, D] without the prd token
    out = np.asarray(ours(a["x"], a["t"], a["text_embed"], a["text_hidden"], a["mask"]))
    assert out.shape == (3, d)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    # The statistics come along.
    np.testing.assert_array_equal(np.asarray(ours.clip_mean[...]),
                                  ref_model.clip_mean.detach().numpy())
    np.testing.assert_array_equal(np.asarray(ours.clip_std[...]),
                                  ref_model.clip_std.detach().numpy())
    # Padding is masked: what padded positions hold changes nothing; real tokens do matter.
    poked = a["text_hidden"].copy()
    poked[~a["mask"]] = 50.0
    out2 = np.asarray(ours(a["x"], a["t"], a["text_embed"], poked, a["mask"]))
    np.testing.assert_allclose(out2, out, rtol=0, atol=1e-6)
    poked = a["text_hidden"].copy()
    poked[:, 0] += 1.0
    out3 = np.asarray(ours(a["x"], a["t"], a["text_embed"], poked, a["mask"]))
    assert np.abs(out3 - out).min(axis=1).max() > 0 and np.abs(out3 - out).max() > 1e-3


def test_load_prior_from_pipeline_folder_and_errors(tmp_path):
    ref = random_prior(**KARLO_LIKE)
    ref.save_pretrained(tmp_path / "pipe" / "prior")
    model = load_prior(tmp_path / "pipe")  # a pipeline folder: its prior/ subfolder
    assert model.config.num_layers == 2 and model.config.embed_norm == "mean_std"

    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "nowhere")
    # A config that asks for more layers than the weights hold: every missing tensor named.
    folder = tmp_path / "pipe" / "prior"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    with pytest.raises(CheckpointMismatchError, match="transformer_blocks.2.attn1.to_q.weight"):
        load_prior(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, additional_embeddings=5)))
    with pytest.raises(CheckpointError, match="additional_embeddings=5"):
        load_prior(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DModel")))
    with pytest.raises(CheckpointError, match="not a PriorTransformer"):
        load_prior(folder)
    # Pickled weights are refused, not opened.
    (folder / "config.json").write_text(json.dumps(cfg))
    os.remove(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickled"):
        load_prior(folder)


def _tiny(**kw):
    return DiffusionPrior(get_preset("tiny", **kw), rngs=nnx.Rngs(0))


def _cond(cfg, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, cfg.context_length), bool)
    mask[1:, 3:] = False
    return TextConditioning(
        rng.standard_normal((batch, cfg.cond_dim)).astype(np.float32),
        rng.standard_normal((batch, cfg.context_length, cfg.token_width)).astype(np.float32),
        mask)


@pytest.mark.parametrize("norm", ["scale", "mean_std", "l2_sqrt_dim"])
def test_embedding_normalisation(norm):
    model = _tiny(embed_norm=norm, embed_scale=17.2)
    d = model.config.embed_dim
    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    if norm == "mean_std":
        mean, std = z.mean(0), z.std(0)
        model.set_embedding_stats(mean, std)
        x = np.asarray(model.normalise(z))
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    elif norm == "scale":
        x = np.asarray(model.normalise(z))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 17.2, rtol=1e-5)
    else:
        x = np.asarray(model.normalise(3.0 * z))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), np.sqrt(d), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.denormalise(model.normalise(z))), z, atol=1e-5)


def test_learned_null_replaces_text_conditioning():
    model = _tiny(learned_null=True)
    cfg = model.config
    cond = _cond(cfg)
    x = np.random.default_rng(1).standard_normal((4, cfg.embed_dim)).astype(np.float32)
    t = jnp.array([5, 50, 500, 900])
    drop = jnp.array([True, False, True, False])
    out = model(x, t, *cond, drop_text=drop)
    plain = model(x, t, *cond)
    null = model(x, t, *model.null_conditioning(4))
    np.testing.assert_allclose(out[~np.asarray(drop)], plain[~np.asarray(drop)], atol=1e-6)
    np.testing.assert_allclose(out[np.asarray(drop)], null[np.asarray(drop)], atol=1e-6)
    assert np.abs(np.asarray(null - plain)).max() > 1e-3
    with pytest.raises(ValueError, match="learned null"):
        _tiny()(x, t, *cond, drop_text=drop)


def test_bad_inputs_get_clear_errors():
    model = _tiny()
    cfg = model.config
    cond = _cond(cfg)
    x = jnp.zeros((4, cfg.embed_dim))
    with pytest.raises(ValueError, match="context_length=8"):
        model(x, jnp.zeros(4, jnp.int32), cond.text_embed, cond.text_hidden[:, :5], cond.text_mask)
    with pytest.raises(ValueError, match="x_t must be"):
        model(x[:, :5], jnp.zeros(4, jnp.int32), *cond)
    with pytest.raises(ValueError, match="embed_norm"):
        PriorConfig(embed_norm="unit")
    with pytest.raises(ValueError, match="dropout_rng"):
        _tiny(dropout=0.1)(x, jnp.zeros(4, jnp.int32), *cond, deterministic=False)


def test_dropout_remat_and_bfloat16():
    model = _tiny(num_layers=1, dropout=0.2)
    cfg = model.config
    cond = _cond(cfg)
    x = np.random.default_rng(2).standard_normal((4, cfg.embed_dim)).astype(np.float32)
    t = jnp.array([1, 2, 3, 4])
    det = model(x, t, *cond)
    k = jax.random.key(0)
    a = model(x, t, *cond, deterministic=False, dropout_rng=k)
    b = model(x, t, *cond, deterministic=False, dropout_rng=k)
    np.testing.assert_array_equal(a, b)  # the explicit key decides, no hidden state
    assert np.abs(np.asarray(a - det)).max() > 1e-4

    state = nnx.state(model)
    remat = _tiny(num_layers=1, dropout=0.2, remat=True)
    nnx.update(remat, state)
    grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, t, *cond) ** 2)))
    g1, g2 = grad(model), grad(remat)
    scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(g1))
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # (key biases: rounding only)
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * scale)

    bf16 = _tiny(num_layers=1, dropout=0.2, dtype="bfloat16")
    nnx.update(bf16, state)
    out = bf16(x, t, *cond)
    assert out.dtype == jnp.float32
    assert bf16.blocks.stack.attn.to_q.kernel[...].dtype == jnp.float32  # params stay float32
    assert np.abs(np.asarray(out - det)).max() < 0.1 * np.abs(np.asarray(det)).max()


def test_logical_axes_and_sizes():
    model = _tiny()
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    block = specs["blocks"]["stack"]  # stacked layers: a leading "layers" axis
    assert tuple(block["attn"]["to_q"]["kernel"].get_value()) == ("layers", "embed", "heads")
    assert tuple(block["mlp"]["fc1"]["kernel"].get_value()) == ("layers", "embed", "mlp")
    assert tuple(block["mlp"]["fc2"]["kernel"].get_value()) == ("layers", "mlp", "embed")
    # clip_mean / clip_std are buffers: not trained.
    assert "clip_mean" not in nnx.state(model, nnx.Param)
    # Big configs by eval_shape only: Karlo's prior is about 1.0B parameters, the paper's ~1.2B.
    assert 0.95e9 < count_params(get_preset("karlo")) < 1.1e9
    n_paper = count_params(get_preset("paper"))
    assert n_paper > 1.0e9 and n_paper < 1.4e9


def test_save_prior_round_trips_through_diffusers(tmp_path):
    from diffusers import PriorTransformer

    from unclip_jax.convert.diffusers_prior import save_prior
    ours = _tiny(num_layers=1, embed_norm="scale", embed_scale=17.2, norm_in=True)
    save_prior(ours, tmp_path)
    theirs = PriorTransformer.from_pretrained(tmp_path).eval()
    cfg = ours.config
    a = _inputs(3, cfg.context_length, cfg.embed_dim, cfg.embed_dim, seed=4)
    with torch.no_grad():
        ref = theirs(hidden_states=torch.tensor(a["x"]), timestep=torch.tensor(a["t"]),
                     proj_embedding=torch.tensor(a["text_embed"]),
                     encoder_hidden_states=torch.tensor(a["text_hidden"]),
                     attention_mask=torch.tensor(a["mask"])).predicted_image_embedding
        post = theirs.post_process_latents(torch.tensor(a["x"])).numpy()
    out = np.asarray(ours(a["x"], a["t"], a["text_embed"], a["text_hidden"], a["mask"]))
    np.testing.assert_allclose(out, ref.numpy().reshape(out.shape), rtol=1e-4, atol=1e-5)
    # diffusers' post_process_latents undoes our normalisation.
    np.testing.assert_allclose(post, np.asarray(ours.denormalise(a["x"])), rtol=1e-6)
    with pytest.raises(CheckpointError, match="learned null"):
        save_prior(_tiny(num_layers=1, learned_null=True), tmp_path / "other")


def test_karlo_sized_layout_holds_the_diffusers_tensors_one_to_one():
    """Karlo's full-size PriorTransformer (built on torch's meta device: nothing allocated) and
    our abstract Karlo prior name and shape the same ~1B-parameter tensors."""
    from diffusers import PriorTransformer

    from unclip_jax.convert.diffusers_prior import config_from_diffusers, param_map
    from unclip_jax.models.diffusion_prior import abstract_prior
    from unclip_jax.models.transformer import unstack_layer_shapes
    from unclip_jax.torch_weights import theirs_shape
    with torch.device("meta"):
        karlo = PriorTransformer()  # the defaults are Karlo's prior
    theirs = {k: tuple(v.shape) for k, v in karlo.state_dict().items()}
    cfg = config_from_diffusers(dict(karlo.config))
    assert cfg == get_preset("karlo")
    table = param_map(cfg)
    shapes = {p: v.shape for p, v in nnx.state(abstract_prior(cfg)).flat_state()}
    ours = {table[p][0]: theirs_shape(shape, table[p][1])
            for p, shape in unstack_layer_shapes(shapes).items()}  # stacked layers, row by row
    assert ours == theirs
    assert len(ours) == len(table)
