"""The whole Shapes unCLIP cascade, small enough to train on a 2-core CPU: the recipe of the
bundled model (unclip_jax/assets/shapes).

The Shapes world is procedural: one or two coloured circles, squares or triangles on a plain
background, each caption stating exactly what is drawn ("a large red circle in the center", "a
blue square to the left of a green triangle"), so every generated image can be judged exactly
against its caption (unclip_jax.evaluate.shapes_judge; `unclip-jax eval`).

One file, one stage per `stage=` argument: clip | diffusion_prior | ar_prior | decoder | sr64 |
sr128. Every stage trains with the project trainer (`unclip-jax train`, Orbax checkpoints in
WORKDIR; rerun the same command to resume, bitwise exactly; SIGTERM saves and exits) and stops at
its `total_steps`, which are the steps the bundled weights had. Data goes to data/ and workdirs to
runs/ under the current folder (`data_dir=` and `emb_dir=` move the data). The recipe, in order:

  # 1. the dataset (50,000 train / 2,000 test images at 128 px)
  unclip-jax shapes --data-dir data/tfds
  # 2. CLIP from scratch (32 px ViT, 3-layer text Transformer of width 64, context 24)
  unclip-jax train --config configs/shapes.py:stage=clip --workdir runs/clip
  # (how well z_i names its caption: retrieval among the distinct test captions, per checkpoint)
  unclip-jax clip-retrieval --clip runs/clip
  # 3. CLIP -> a Hugging Face CLIPModel folder (what `precompute` reads)
  unclip-jax export --workdir runs/clip --hf-out runs/clip_hf
  # 4. CLIP embeddings of the train split (+ text states and the 32 px images)
  unclip-jax precompute --clip runs/clip_hf --input tfds:shapes:train --data-dir data/tfds \
      --out data/emb --hidden --hidden-dtype float16 --image-size 32 --batch-size 256
  # 5. the priors, the decoder and the upsamplers (the upsamplers need only the dataset)
  unclip-jax train --config configs/shapes.py:stage=diffusion_prior --workdir runs/prior
  unclip-jax train --config configs/shapes.py:stage=ar_prior --workdir runs/ar_prior
  unclip-jax train --config configs/shapes.py:stage=decoder --workdir runs/decoder
  unclip-jax train --config configs/shapes.py:stage=sr64 --workdir runs/sr64
  unclip-jax train --config configs/shapes.py:stage=sr128 --workdir runs/sr128
  # 6. the pipeline folder (bfloat16; EMA weights but CLIP's; Shapes sampling defaults)
  unclip-jax export --workdir runs/clip --out shapes_model --name clip --dtype bfloat16
  unclip-jax export --workdir runs/prior --out shapes_model \
      --name prior --ema --dtype bfloat16 --sampling shapes
  unclip-jax export --workdir runs/ar_prior --out shapes_model \
      --name ar_prior --ema --dtype bfloat16 --sampling shapes
  unclip-jax export --workdir runs/decoder --out shapes_model \
      --name decoder --ema --dtype bfloat16 --sampling shapes
  unclip-jax export --workdir runs/sr64 --out shapes_model \
      --name sr64 --ema --dtype bfloat16 --sampling shapes
  unclip-jax export --workdir runs/sr128 --out shapes_model \
      --name sr128 --ema --dtype bfloat16 --sampling shapes
  # 7. how well it draws (500 test captions x 2 images at 128 px; the table at 32 px)
  unclip-jax eval --checkpoint shapes_model --num-captions 500 --table --table-captions 50 \
      --out out/eval_shapes.md

The bundled model is that folder (copied to unclip_jax/assets/shapes). `runlocal` shrinks batch
and steps for a smoke test and reads the tiny Shapes dataset (`unclip-jax shapes --config tiny
--data-dir data/tfds`: 64 / 32 images).

Expected (measured on this project's 2-core CPU; wall times; stages 1-5 except the decoder ran
in the previous session, several side by side with a load average of 5-14, so alone they are faster):
  dataset          4.4 min (50,000 / 2,000 images)
  clip             563 steps x 128 in 15 min: in-batch accuracy ~0.75; retrieval of the right
                   caption from z_i (`unclip-jax clip-retrieval`: 2,000 test images, 979
                   distinct captions, mirror captions right): one-object 0.70, two-object 0.29
  export + precompute  10 s + 3.8 min (30,000 train examples)
  diffusion_prior  1,500 steps x 64 in 22 min, loss 0.056: sampled z_i has cosine 0.98 with the
                   true z_i (z_t itself: 0.91); its nearest true image has the caption 82% of times
  ar_prior         1,000 steps x 64 in ~20 min, cross-entropy 3.0 (64 buckets): undertrained
  decoder          4,214 steps x 64 in 84 min alone on the machine (0.85 steps/s), v-prediction,
                   learned variance; loss 0.018 (v MSE + 0.001 x the VLB)
  sr64 / sr128     800 steps x 32 on 32 px crops, 15 / 17 min, eps MSE 0.011 / 0.008
  bundle           13 MB (bfloat16), 6 components
  eval             `unclip-jax eval` (step 7): 500 test captions x 2 images at 128 px, upsamplers
                   from t = 200: one-object 79.2% (colour 100, size 100, position 90.4, shape
                   89.4: the upsamplers round small squares), two-object 5.9% (both objects
                   found 57%, relation 16%, binding 35%), 24.6 min for the whole command. The
                   decoder's own 32 px output: one-object 90%, two-object 4% (table, 50 captions).
                   Shipped defaults (upsamplers from t = 60), 500 captions x 1 image: one-object
                   85.3% (shape 96.7, position 89.8), two-object 7.8%; 15 min.
Why v-prediction: the first decoder predicted eps. After 2,000 steps its eps error was ~0.05 at
every t, which at t >= 900 is an error of 0.4-1.0 in the implied x0, so sampling (which starts
there) drew saturated tinted backgrounds and grain and the judge read ~0% of the captions. With
v the x0 implied at high noise is -v itself: the same step count gave clean images.
"""
import ml_collections

from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config

STAGES = ("clip", "diffusion_prior", "ar_prior", "decoder", "sr64", "sr128")
CONTEXT = 24          # CLIP tokens per caption (the longest Shapes caption is ~12)
CLIP_WIDTH = 64       # CLIP embedding width D and text width W

CLIP_MODEL = dict(embed_dim=CLIP_WIDTH, vocab_size=49408, context_length=CONTEXT,
                  text_width=CLIP_WIDTH, text_layers=3, text_heads=2, text_mlp_dim=4 * CLIP_WIDTH,
                  image_size=32, patch_size=4, vision_width=64, vision_layers=4, vision_heads=2,
                  vision_mlp_dim=256, activation="quick_gelu", layer_norm_eps=1e-5,
                  eos_token_id=49407, logit_scale_init=2.6592600369262695, dtype="float32",
                  param_dtype="float32", remat=False)

PRIOR_MODEL = dict(embed_dim=CLIP_WIDTH, text_embed_dim=CLIP_WIDTH, text_width=CLIP_WIDTH,
                   context_length=CONTEXT, num_heads=4, head_dim=32, num_layers=4,
                   time_embed_dim=None, time_embed_act="silu", norm_in=False,
                   text_embed_norm=False, text_proj=True, prd_token=True, dropout=0.0,
                   embed_norm="mean_std", embed_scale=17.2, learned_null=True,
                   layer_norm_eps=1e-5, dtype="float32", param_dtype="float32", remat=False)

AR_MODEL = dict(embed_dim=CLIP_WIDTH, text_width=CLIP_WIDTH, text_context=CONTEXT,
                num_components=32, num_buckets=64, num_dot_buckets=32, width=128, depth=4,
                heads=4, mlp_ratio=4, dropout=0.0, layer_norm_eps=1e-5, dtype="float32",
                param_dtype="float32", remat=False)

# The decoder is conditioned on z_i (timestep embedding + 4 context tokens for its attention) and
# on z_t (timestep embedding); no text-token path, so guidance's unconditional branch (learned
# null z_i, z_t dropped) is exactly what training drops.
DECODER_MODEL = dict(image_size=32, image_channels=3, out_channels=6, channels=16,
                     channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,),
                     mid_attention=True, head_dim=32, groups=8, norm_eps=1e-5, dropout=0.0,
                     time_embed_dim=None, flip_sin_to_cos=True, freq_shift=0.0,
                     resblock_updown=True, clip_dim=CLIP_WIDTH, context_dim=64, clip_tokens=4,
                     use_text_embed=True, text_encoder="none", text_width=None,
                     text_layer_norm_eps=1e-5, xf_width=64, xf_layers=1, xf_heads=2, xf_ctx=CONTEXT,
                     xf_vocab=49408, dtype="float32", param_dtype="float32", remat=False)

SR_MODEL = dict(image_channels=3, out_channels=3, channels=16, channel_mult=(1, 2),
                num_res_blocks=1, groups=8, norm_eps=1e-5, scale_shift=True, resblock_updown=True,
                dropout=0.0, time_embed_dim=None, flip_sin_to_cos=True, freq_shift=0.0,
                dtype="float32", param_dtype="float32", remat=False)


def _optimizer(lr, warmup, b2=0.999, wd=0.0, clip=1.0):
    return ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=lr, b1=0.9, b2=b2, eps=1e-8, weight_decay=wd,
        warmup_steps=warmup, grad_clip_norm=clip, lr_schedule="constant", accum_steps=1))


def get_config(arg=None):
    arg = parse_arg(arg, stage="decoder", data_dir="data/tfds", emb_dir="data/emb",
                    runlocal=False)
    if arg.stage not in STAGES:
        raise ValueError(f"Unknown Shapes stage {arg.stage!r}; choose one of {', '.join(STAGES)}.")
    local = arg.runlocal
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.shapes_stage = arg.stage
    add_trainer_sections(c, checkpoint_every=20 if local else 200, eval_every=0, keep=2)
    c.mesh.min_shard_bytes = 1 << 30   # everything replicated: these models are tiny
    c.log_every = 1 if local else 25
    tfds_input = dict(kind="tfds", tfds_name="shapes/tiny" if local else "shapes",
                      tfds_split="train", data_dir=arg.data_dir,
                      crop="center", resize_method="area", shuffle_buffer=256 if local else 5000,
                      cycle_length=1)
    emb_input = dict(kind="embeddings", paths=[arg.emb_dir], context_length=0,
                     shuffle_buffer=256 if local else 10_000)

    if arg.stage == "clip":
        c.stage = "clip"
        c.model = ml_collections.ConfigDict(CLIP_MODEL)
        c.batch_size = 16 if local else 128
        c.total_steps = 4 if local else 563
        c.optimizer = _optimizer(1e-3, 2 if local else 100, b2=0.98, wd=0.1)
        c.ema_decay = 0.0
        c.negative_weight = 1.0   # used only with --config.input.negative_captions=shapes
        # bicubic (antialiased) to 32 px: what precompute's CLIP preprocessing does
        c.input = input_config(**dict(tfds_input, image_size=32, resize_method="bicubic",
                                      context_length=CONTEXT))
    elif arg.stage == "diffusion_prior":
        c.stage = "diffusion_prior"
        c.model = ml_collections.ConfigDict(PRIOR_MODEL)
        c.diffusion = ml_collections.ConfigDict(dict(num_train_steps=1000, schedule="cosine",
                                                     cond_drop_prob=0.1))
        c.sampling = ml_collections.ConfigDict(dict(
            sampler="ddim", steps=16, spacing=None, guidance_scale=1.0, best_of=2,
            clip_range=None, eta=0.0, num_train_steps=1000, schedule="cosine"))
        c.batch_size = 16 if local else 64
        c.total_steps = 4 if local else 1500
        c.optimizer = _optimizer(5e-4, 2 if local else 100, b2=0.99, wd=0.0, clip=0.0)
        c.ema_decay = 0.999
        c.input = input_config(**emb_input)
    elif arg.stage == "ar_prior":
        c.stage = "ar_prior"
        c.model = ml_collections.ConfigDict(AR_MODEL)
        c.quantizer = ml_collections.ConfigDict(dict(fit_examples=64 if local else 4096,
                                                     max_quantile_samples=1 << 17))
        c.text_drop_prob = 0.1
        c.sample = ml_collections.ConfigDict(dict(guidance_scale=1.0, temperature=1.0,
                                                  top_p=1.0, dot_percentile=50.0,
                                                  best_of=2))
        c.batch_size = 16 if local else 64
        c.total_steps = 4 if local else 1000
        c.optimizer = _optimizer(1e-3, 2 if local else 100, b2=0.99, wd=0.0, clip=0.0)
        c.ema_decay = 0.999
        c.input = input_config(**emb_input)
    elif arg.stage == "decoder":
        c.stage = "decoder"
        c.model = ml_collections.ConfigDict(DECODER_MODEL)
        c.diffusion = ml_collections.ConfigDict(dict(
            schedule="cosine", num_train_steps=1000, prediction_type="v_prediction",
            learned_variance=True, vlb_weight=0.001, image_drop_prob=0.1, text_drop_prob=0.5))
        c.sampling = ml_collections.ConfigDict(dict(steps=16, guidance_scale=3.0))
        c.batch_size = 8 if local else 64
        c.total_steps = 4 if local else 4214
        c.optimizer = _optimizer(1e-3, 2 if local else 100)
        c.ema_decay = 0.995
        c.eval_every = 0 if local else 200
        c.input = input_config(**dict(emb_input, image_size=32))
    else:  # sr64 / sr128
        low, target = (32, 64) if arg.stage == "sr64" else (64, 128)
        c.stage = "upsampler"
        c.model = ml_collections.ConfigDict(SR_MODEL)
        c.low_res_size = low
        c.image_size = target
        c.crop_fraction = 0.25 if arg.stage == "sr128" else 0.5
        c.degradation = "blur"
        c.diffusion = ml_collections.ConfigDict(dict(
            schedule="cosine", num_train_steps=1000, prediction_type="epsilon",
            learned_variance=False))
        c.sampling = ml_collections.ConfigDict(dict(sampler="ddim", steps=8))
        c.batch_size = 8 if local else 32
        c.total_steps = 4 if local else 800
        c.optimizer = _optimizer(1e-3, 2 if local else 100)
        c.ema_decay = 0.995
        c.eval_every = 0 if local else 500
        c.input = input_config(**dict(tfds_input, image_size=target, low_res_size=low,
                                      low_res_degradation="blur"))
    return c
