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
  # 2. CLIP from scratch (64 px ViT with 8 px patches, 4 layers of width 128; 3-layer text
  #    Transformer of width 64, context 24; each two-object caption's three hard negatives)
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
  # 7. how well it draws (500 test captions x 2 images at 128 px; the paper's comparisons on
  #    the decoder's own 32 px output, 100 captions x 2 images per row)
  unclip-jax eval --checkpoint shapes_model --num-captions 500 --out out/eval_shapes.md
  unclip-jax eval --checkpoint shapes_model --num-captions 100 --upsample 0 --table \
      --out out/eval_shapes_table.md

The bundled model is that folder (copied to unclip_jax/assets/shapes). `runlocal` shrinks batch
and steps for a smoke test and reads the tiny Shapes dataset (`unclip-jax shapes --config tiny
--data-dir data/tfds`: 64 / 32 images).

Expected (measured on this project's 2-core CPU, wall times; two stages often ran side by side,
one core each, as noted; the decoder with
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution, Eigen's convolutions,
1.15x faster on its step here in a same-run A/B of the two settings). The bundle's stages ran on
one CPU device; the recipe now gives the decoder and sr64 one per core
(mesh.cpu_devices=-1: 1.31x the decoder's steps/s on 2 cores with the default convolutions),
which changes their numbers bitwise but not the recipe:
  dataset          4.4 min (50,000 / 2,000 images)
  clip             2,000 steps x 256 (+ 3 hard negatives per two-object caption), 0.47 steps/s
                   alone (~71 min; this run took 104 min sharing the cores): retrieval of the
                   right caption from z_i (`unclip-jax clip-retrieval`: 2,000 test images, 979
                   distinct captions, mirror captions right): one-object 1.000, two-object 0.958
                   (0.535 at step 1,000, 0.891 at 1,500; that curve needs every checkpoint:
                   --config.checkpoint.every_steps=250 --config.checkpoint.keep=100)
  export + precompute  10 s + 2.1 min (50,000 train examples)
  diffusion_prior  3,000 steps x 64 in 12 min (one core), loss 0.07
  ar_prior         5,000 steps x 64 in 48 min (one core), cross-entropy 2.50 (64 buckets)
  decoder          8,000 steps x 64 (caption tokens from CLIP's text states), 1.5 steps/s alone
                   (~90 min; this run took 118 min sharing the cores), v-prediction, learned
                   variance; loss 0.013 (v MSE + 0.001 x the VLB)
  sr64             3,000 steps x 32 on 16 px crops of 64 px, blur: 9 min (one core), eps MSE 0.011
  sr128            3,000 steps x 32 on 32 px crops of 128 px, BSR: 109 min (one core: 12x
                   sr64's time per step for 4x its pixels; the BSR degradation alone takes
                   0.34 s per batch of 32 on one core, blur 0.04 s), eps MSE 0.010
  bundle           14 MB (bfloat16), 6 components
  eval             step 7's first command: one-object 100%, two-object 90.0% (relation 98.6%,
                   binding given both colours and shapes 100%, exactly two objects 92.4%); the
                   same images at the decoder's 32 px (`--upsample 0`): 100% / 90.4%; 13 min
                   (sharing the cores with a test run). The table: 25 min (sharing them with
                   the upsamplers' training).
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
                  image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                  vision_mlp_dim=512, activation="quick_gelu", layer_norm_eps=1e-5,
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

# The decoder as the paper has it: z_i into the timestep embedding and as 4 context tokens, beside
# the caption's tokens (CLIP's text states, Karlo's choice, projected from width 64) and z_t;
# the caption is dropped half the time and z_i a tenth, and guidance drops both.
DECODER_MODEL = dict(image_size=32, image_channels=3, out_channels=6, channels=16,
                     channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,),
                     mid_attention=True, head_dim=32, groups=8, norm_eps=1e-5, dropout=0.0,
                     time_embed_dim=None, flip_sin_to_cos=True, freq_shift=0.0,
                     resblock_updown=True, clip_dim=CLIP_WIDTH, context_dim=64, clip_tokens=4,
                     use_text_embed=True, text_encoder="clip", text_width=CLIP_WIDTH,
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
    if arg.stage in ("decoder", "sr64"):
        # One CPU device per core: XLA's CPU convolutions run on one thread at these sizes,
        # and several devices run them side by side (unclip_jax.train.distributed). On 2 cores
        # (benchmarks/cpu_devices.py, our two settings in one run, quiet machine, load 0.97-2.6):
        # the decoder 1.31x the steps/s, sr64 1.17x; sr128 1.01x (its BSR input is the limit
        # there), so it keeps one device. No effect on a GPU or TPU.
        c.mesh.cpu_devices = -1
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
        c.batch_size = 16 if local else 256
        c.total_steps = 4 if local else 2000
        c.optimizer = _optimizer(1e-3, 1 if local else 200, b2=0.98, wd=0.1)
        c.optimizer.lr_schedule = "cosine"
        c.optimizer.total_steps = c.total_steps
        c.ema_decay = 0.0
        # each caption's hard negatives (objects exchanged, relation turned, shapes exchanged)
        # in the loss: without them the text tower reads a two-object caption as a bag of words
        c.negative_weight = 1.0
        # bicubic (antialiased) to 64 px: what precompute's CLIP preprocessing does
        c.input = input_config(**dict(tfds_input, image_size=64, resize_method="bicubic",
                                      context_length=CONTEXT, negative_captions="shapes"))
    elif arg.stage == "diffusion_prior":
        c.stage = "diffusion_prior"
        c.model = ml_collections.ConfigDict(PRIOR_MODEL)
        c.diffusion = ml_collections.ConfigDict(dict(num_train_steps=1000, schedule="cosine",
                                                     cond_drop_prob=0.1))
        c.sampling = ml_collections.ConfigDict(dict(
            sampler="ddim", steps=16, spacing=None, guidance_scale=1.0, best_of=2,
            clip_range=None, eta=0.0, num_train_steps=1000, schedule="cosine"))
        c.batch_size = 16 if local else 64
        c.total_steps = 4 if local else 3000
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
        c.total_steps = 4 if local else 5000
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
        c.total_steps = 4 if local else 8000
        c.optimizer = _optimizer(1e-3, 2 if local else 100)
        c.ema_decay = 0.995
        c.eval_every = 0 if local else 500
        c.input = input_config(**dict(emb_input, image_size=32))
    else:  # sr64 / sr128
        low, target = (32, 64) if arg.stage == "sr64" else (64, 128)
        c.stage = "upsampler"
        c.model = ml_collections.ConfigDict(SR_MODEL)
        c.low_res_size = low
        c.image_size = target
        # the paper's: random crops a quarter of the target size, Gaussian blur for the first
        # upsampler and the BSR degradation for the second
        c.crop_fraction = 0.25
        c.degradation = "blur" if arg.stage == "sr64" else "bsr"
        c.diffusion = ml_collections.ConfigDict(dict(
            schedule="cosine", num_train_steps=1000, prediction_type="epsilon",
            learned_variance=False))
        c.sampling = ml_collections.ConfigDict(dict(sampler="ddim", steps=8))
        c.batch_size = 8 if local else 32
        c.total_steps = 4 if local else 3000
        c.optimizer = _optimizer(1e-3, 2 if local else 100)
        c.ema_decay = 0.995
        c.eval_every = 0 if local else 500
        c.input = input_config(**dict(tfds_input, image_size=target, low_res_size=low,
                                      low_res_degradation=c.degradation))
    return c
