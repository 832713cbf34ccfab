"""Helpers shared by the parity tests: torch reference models with every parameter random.

diffusers and transformers initialise several parameters to zero or one (output convolutions,
norm scales, the prior's prd token, clip_mean / clip_std); a parity test on those defaults would
not see a wrong mapping of them, so every parameter is replaced here.
"""
import os

import torch

KARLO_LIKE_PRIOR = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                        embedding_dim=12, num_embeddings=6, additional_embeddings=4,
                        added_emb_type="prd", encoder_hid_proj_type="linear")


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, in place: norm scales around 1, the rest scaled by fan-in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            offset = 1.0 if (p.ndim == 1 and "norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / fan_in ** 0.5 + offset)


def random_prior(seed=0, **config):
    """A diffusers PriorTransformer with EVERY parameter random (norms, biases, positions, prd
    token, clip_mean / clip_std included)."""
    from diffusers import PriorTransformer
    torch.manual_seed(seed)
    model = PriorTransformer(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name == "clip_std":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(0.5 * noise / fan_in ** 0.25)
    return model


# ----------------------------------------------------------------------------- a tiny Karlo

D = 32            # CLIP embedding = text width (as ViT-L/14's 768 = 768)
DEC_SIZE, SR_SIZE = 8, 16


def _tokenizer(folder):
    """A transformers CLIPTokenizer with CLIP's BPE vocabulary, written from ours (no download)."""
    from transformers import CLIPTokenizer

    from unclip_jax.clip.tokenizer import Tokenizer
    return CLIPTokenizer(*Tokenizer().write_vocab_files(folder), model_max_length=77)


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
