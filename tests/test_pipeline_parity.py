"""THE image-parity test: a scaled-down Karlo (diffusers UnCLIPPipeline, every weight random)
converted with `convert_diffusers_pipeline` and run by our UnCLIPPipeline with diffusers' own
noise draws gives the same prior embeddings, decoder images and upsampled images.

Precision note. diffusers' UnCLIPScheduler keeps its constants in float32 and forms
alpha = 1 - (1 - acp[t] / acp[prev]); at the first step (t = 999 -> 666) acp[999] / acp[666] is
~5e-9, so float32 rounds beta to 1 and alpha to 0 and the x_t term of the posterior mean
vanishes: a ~2e-4 absolute departure from the exact update that we do not copy (our steps keep
that ratio in log space). The parity runs therefore give diffusers' schedulers float64 constants
(their tensors' math is unchanged; 0-dim float64 scalars do not promote the float32 latents) and
our pipeline the exact float64 schedule (float32_cumprod=False); everything else, weights and
noise included, is as shipped. Result: every stage within 1e-4 relative (measured ~1e-6).
"""
import json
import os

import numpy as np
import pytest
import torch

from torch_reference import randomize, random_prior

D = 32            # CLIP embedding = text width (as ViT-L/14's 768 = 768)
DEC_SIZE, SR_SIZE = 8, 16
STEPS = dict(prior=4, decoder=4, super_res=3)


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    from unclip_jax.clip.tokenizer import Tokenizer
    ours = Tokenizer()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(ours.encoder, f)
    merges = sorted(ours.merge_rank, key=ours.merge_rank.get)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=77)


def build_tiny_karlo(folder, seed=0):
    """A diffusers UnCLIPPipeline with Karlo's architecture scaled down, saved to ``folder``."""
    from diffusers import UNet2DConditionModel, UNet2DModel, UnCLIPPipeline, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=D,
        eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)).eval()
    randomize(text_encoder, seed + 1)
    prior = random_prior(seed + 2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                         embedding_dim=D, num_embeddings=77, additional_embeddings=4,
                         added_emb_type="prd", encoder_hid_proj_type="linear")
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=D,
                                    time_embed_dim=64, cross_attention_dim=24).eval()
    decoder = UNet2DConditionModel(
        sample_size=DEC_SIZE, in_channels=3, out_channels=6, block_out_channels=(16, 32),
        layers_per_block=1, attention_head_dim=8, cross_attention_dim=24, norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type="identity",
        resnet_time_scale_shift="scale_shift").eval()
    srs = []
    for i in range(2):  # Karlo: 3 output channels, additive time conditioning
        srs.append(UNet2DModel(
            sample_size=SR_SIZE, in_channels=6, out_channels=3, block_out_channels=(16, 32),
            layers_per_block=1, norm_num_groups=4, add_attention=False,
            down_block_types=("ResnetDownsampleBlock2D",) * 2,
            up_block_types=("ResnetUpsampleBlock2D",) * 2,
            resnet_time_scale_shift="default").eval())
    for i, m in enumerate([text_proj, decoder] + srs):
        randomize(m, seed + 10 + i)
    with torch.no_grad():  # random weights give large outputs: keep x0 estimates mostly inside
        for m in srs:     # the clip range, so clipping does not hide a wrong mapping
            m.conv_out.weight.mul_(0.2)
        decoder.conv_out.weight.mul_(0.2)
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder,
        tokenizer=_tokenizer(os.path.join(folder, "_tok")), text_proj=text_proj,
        super_res_first=srs[0], super_res_last=srs[1],
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample=True, clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                          prediction_type="epsilon", clip_sample=True,
                                          clip_sample_range=1.0),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="epsilon", clip_sample=True,
                                            clip_sample_range=1.0))
    pipe.save_pretrained(folder)
    return pipe


def exact_schedulers(pipe):
    """Give diffusers' UnCLIPSchedulers float64 constants (see the module docstring)."""
    from unclip_jax.diffusion import cosine_betas
    for sch in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):
        betas = torch.from_numpy(cosine_betas(sch.config.num_train_timesteps))
        sch.betas, sch.alphas = betas, 1.0 - betas
        sch.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sch.one = torch.tensor(1.0, dtype=torch.float64)


def _run_diffusers(pipe, prompts, per_prompt, seed=0):
    """Run diffusers' pipeline, recording the scheduler noise draws and each stage's output."""
    import diffusers.pipelines.deprecated.unclip.pipeline_unclip as pl
    import diffusers.schedulers.scheduling_unclip as sched
    import torch.nn.functional as F

    n = len(prompts) * per_prompt
    g = torch.Generator().manual_seed(seed)
    latents = dict(prior_latents=torch.randn((n, D), generator=g),
                   decoder_latents=torch.randn((n, 3, DEC_SIZE, DEC_SIZE), generator=g),
                   super_res_latents=torch.randn((n, 3, SR_SIZE, SR_SIZE), generator=g))
    draws, record = [], {}
    real_randn = sched.randn_tensor

    def randn(*a, **k):
        out = real_randn(*a, **k)
        draws.append(out.numpy().copy())
        return out

    class RecordF:
        def __getattr__(self, name):
            return getattr(F, name)

        # The pipeline passes antialias=True only if the signature names it: keep it named.
        def interpolate(self, x, size=None, scale_factor=None, mode="nearest",
                        align_corners=None, recompute_scale_factor=None, antialias=False):
            record["decoder"] = x.numpy().copy()
            out = F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor,
                                antialias=antialias)
            record["antialias"] = antialias
            record["upscaled"] = out.numpy().copy()
            return out

    post = pipe.prior.post_process_latents

    def post_process(x):
        out = post(x)
        record["prior"] = out.numpy().copy()
        return out

    sched.randn_tensor, pl.F, pipe.prior.post_process_latents = randn, RecordF(), post_process
    try:
        out = pipe(prompts, num_images_per_prompt=per_prompt,
                   prior_num_inference_steps=STEPS["prior"],
                   decoder_num_inference_steps=STEPS["decoder"],
                   super_res_num_inference_steps=STEPS["super_res"], generator=g,
                   output_type="np", **latents).images
    finally:
        sched.randn_tensor, pl.F = real_randn, F
        pipe.prior.post_process_latents = post
    record["final"] = out
    return {k: v.numpy() for k, v in latents.items()}, draws, record


def _stage_noise(draws, steps):
    """Diffusers draws per step with t > 0 (all but the last): [steps, ...] with a zero tail."""
    arr = np.stack(draws)
    return np.concatenate([arr, np.zeros_like(arr[:1])], axis=0)


def _nhwc(x):
    return np.moveaxis(x, -3, -1)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / (np.abs(b).max() + 1e-12))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from unclip_jax.convert.diffusers_pipeline import convert_diffusers_pipeline
    src = str(tmp_path_factory.mktemp("karlo_tiny"))
    pipe = build_tiny_karlo(src)
    dst = str(tmp_path_factory.mktemp("ours") / "pipe")
    report = convert_diffusers_pipeline(src, dst)
    return pipe, dst, report


def test_stage_by_stage_parity_with_diffusers(converted):
    from unclip_jax.pipeline import UnCLIPPipeline
    pipe, dst, report = converted
    assert set(report["components"]) == {"text_encoder", "prior", "decoder", "super_res_first",
                                         "super_res_last"}
    prompts, per = ["a red circle", "two blue squares at the top"], 2
    exact_schedulers(pipe)
    latents, draws, ref = _run_diffusers(pipe, prompts, per)
    exact = dict(float32_cumprod=False)
    n_prior, n_dec = STEPS["prior"] - 1, STEPS["decoder"] - 1
    assert len(draws) == n_prior + n_dec + STEPS["super_res"] - 1
    prior_noise = _stage_noise(draws[:n_prior], STEPS["prior"])
    dec_noise = _nhwc(_stage_noise(draws[n_prior:n_prior + n_dec], STEPS["decoder"]))
    sr_noise = _nhwc(_stage_noise(draws[n_prior + n_dec:], STEPS["super_res"]))

    ours = UnCLIPPipeline.from_pretrained(dst)
    assert ours.settings["prior"]["clip_range"] == 5.0
    assert ours.settings["decoder"]["variance"] == "learned_range"
    text = ours.encode_text(prompts)
    z_i = ours.sample_image_embeds(text, num_images=per, steps=STEPS["prior"],
                                   x_T=latents["prior_latents"], noise=prior_noise, **exact)
    errors = {"prior": _rel(z_i, ref["prior"])}

    # Each later stage is fed diffusers' input to that stage, so errors do not compound.
    x = ours.decode(ref["prior"], text, steps=STEPS["decoder"],
                    x_T=_nhwc(latents["decoder_latents"]), noise=dec_noise, **exact)
    assert x.shape == (4, DEC_SIZE, DEC_SIZE, 3)
    errors["decoder"] = _rel(x, _nhwc(ref["decoder"]))

    up = ours.upsample(_nhwc(ref["decoder"]), steps=STEPS["super_res"],
                       x_T=_nhwc(latents["super_res_latents"]), noise=sr_noise, **exact)
    final = np.clip(np.asarray(up) * 0.5 + 0.5, 0, 1)
    assert up.shape == (4, SR_SIZE, SR_SIZE, 3)
    errors["super_res"] = _rel(final, ref["final"])
    assert ref["antialias"] is True  # what diffusers runs, and what our resize reproduces

    # And the whole chain from our own z_i: still close (the errors above compound).
    x2 = ours.decode(z_i, text, steps=STEPS["decoder"], x_T=_nhwc(latents["decoder_latents"]),
                     noise=dec_noise, **exact)
    up2 = ours.upsample(x2, steps=STEPS["super_res"], x_T=_nhwc(latents["super_res_latents"]),
                        noise=sr_noise, **exact)
    errors["chain"] = _rel(np.clip(np.asarray(up2) * 0.5 + 0.5, 0, 1), ref["final"])
    print("relative errors:", errors)
    assert max(errors.values()) < 1e-4, errors
