"""The unCLIP decoder: CLIP image embedding z_i (+ caption) -> 64x64 image.

Commands:
  unclip-jax config --config configs/decoder.py:size=karlo   # print the resolved config
  unclip-jax precompute --input shapes:train --num 256 --hidden --image-size 16 --out data/emb_tiny
  unclip-jax train  --config configs/decoder.py:runlocal --workdir runs/decoder_tiny
      (runlocal: the tiny size on the bundled model's CLIP embeddings, 64 wide, of 256 Shapes
      images, which the line above writes)
  unclip-jax train  --config configs/decoder.py:size=karlo --workdir runs/decoder \
      --config.input.paths=data/emb
      (data/emb: `unclip-jax precompute --hidden --image-size 64` output of a CLIP as wide as
      the size's clip_dim and text_width, 768 for karlo, e.g. ViT-L/14; rerun the same command
      to resume; sample grids go to WORKDIR/samples/)

Sizes (the `model` fields are unclip_jax.models.decoder.DecoderConfig):
  paper  Table 3: ADM UNet 512 channels, 3 res blocks, mult 1,2,3,4, heads of 64 channels at
         32, 16 and 8 pixels, dropout 0.1, a trainable GLIDE-style text Transformer (256 tokens,
         2048 wide, 24 layers, 32 heads), ViT-H/16 embeddings (1024): about 3.57B parameters
         (Table 3: 3.5B; tests/test_decoder.py counts them with nnx.eval_shape).
  karlo  Karlo v1.0-alpha (diffusers UNet2DConditionModel + UnCLIPTextProjModel): 320 channels,
         same depth and attention, context tokens 1536 wide, CLIP ViT-L/14 text states passed in
         (768): about 0.89B parameters. Released weights load with
         unclip_jax.convert.diffusers.load_decoder(pipeline_folder).
  tiny   for tests and runlocal: 32 channels, 2 levels, 16x16 images, the bundled Shapes
         CLIP's widths (64).
Training: hybrid loss (epsilon MSE + 0.001 * VLB, learned variance range), cosine schedule with
1000 steps; z_i replaced by the learned null embedding 10% of the time and the caption dropped
50% of the time (classifier-free guidance); AdamW lr 1.2e-4, beta2 0.999, eps 1e-8, EMA 0.9999,
batch 2048 for 800K steps. Sampling: 250 steps with learned sigma (paper), guidance scale 8
(Karlo: 25 steps).

Expected: paper size, 800K steps on the full data: MS-COCO zero-shot FID 10.39 with the diffusion
prior (Table 2) -- not reproduced here. runlocal (tiny, 2-core CPU): a few seconds per step; the
loss of a tiny model falls when it overfits a fixed batch (tests/test_decoder_stage.py).
"""
import ml_collections

from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config

_COMMON = dict(image_size=64, image_channels=3, out_channels=6, channel_mult=(1, 2, 3, 4),
               num_res_blocks=3, attention_levels=(1, 2, 3), mid_attention=True, head_dim=64,
               groups=32, norm_eps=1e-5, time_embed_dim=None, flip_sin_to_cos=True,
               freq_shift=0.0, resblock_updown=True, clip_tokens=4, text_layer_norm_eps=1e-5,
               xf_width=512, xf_layers=4, xf_heads=8, xf_ctx=77, xf_vocab=49408,
               dtype="float32", param_dtype="float32", remat=False)

SIZES = {
    "paper": dict(_COMMON, channels=512, dropout=0.1, clip_dim=1024, context_dim=2048,
                  use_text_embed=True, text_encoder="transformer", text_width=None,
                  xf_width=2048, xf_layers=24, xf_heads=32, xf_ctx=256),
    "karlo": dict(_COMMON, channels=320, dropout=0.1, clip_dim=768, context_dim=1536,
                  use_text_embed=True, text_encoder="clip", text_width=768),
    "tiny": dict(_COMMON, image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), head_dim=16, groups=8, dropout=0.0, clip_dim=64,
                 context_dim=32, use_text_embed=True, text_encoder="clip", text_width=64),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="karlo", runlocal=False)
    size = "tiny" if arg.runlocal else arg.size
    if size not in SIZES:
        raise ValueError(f"Unknown decoder size {size!r}; choose one of {', '.join(SIZES)}.")
    c = ml_collections.ConfigDict()
    c.stage = "decoder"
    c.seed = 0
    c.model = ml_collections.ConfigDict(SIZES[size])
    c.model_size = size
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_train_steps=1000, prediction_type="epsilon",
        learned_variance=True, vlb_weight=0.001, image_drop_prob=0.1, text_drop_prob=0.5))
    c.sampling = ml_collections.ConfigDict(dict(
        steps=25 if size == "karlo" else 250, guidance_scale=8.0))
    c.batch_size = 4 if arg.runlocal else 2048
    c.total_steps = 20 if arg.runlocal else 800_000
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1.2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        warmup_steps=0 if arg.runlocal else 10_000, grad_clip_norm=1.0))
    c.ema_decay = 0.0 if arg.runlocal else 0.9999
    c.log_every = 1 if arg.runlocal else 500
    c.input = input_config(  # --config.input.paths=DIR (unclip-jax precompute output)
        kind="embeddings", image_size=c.model.image_size, context_length=0,
        paths=["data/emb_tiny"] if arg.runlocal else [])
    add_trainer_sections(c, checkpoint_every=10 if arg.runlocal else 10_000,
                         eval_every=10 if arg.runlocal else 10_000)
    return c
