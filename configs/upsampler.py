"""The diffusion upsamplers: 64 -> 256 and 256 -> 1024, conditioned on the low-resolution image.

Commands:
  unclip-jax config --config configs/upsampler.py:size=paper_256   # print the resolved config
  unclip-jax train  --config configs/upsampler.py:size=paper_1024 --workdir runs/sr1024 \
      --config.input.paths='["shards/*.tar"]'
      (webdataset shards of images; rerun the same command to resume; sample grids go to
      WORKDIR/samples/)
  unclip-jax shapes --config tiny --data-dir data/tfds
  unclip-jax train  --config configs/upsampler.py:runlocal --workdir runs/sr_tiny
      (runlocal reads the tiny Shapes dataset the line above builds)

Sizes (the `model` fields are unclip_jax.models.upsampler.SuperResConfig):
  paper_256   Table 3, 64 -> 256: 320 channels, 3 res blocks, mult 1,2,3,4, no attention,
              dropout 0.1, cosine schedule; Gaussian-blur degradation (kernel 3, sigma 0.6):
              about 730M parameters (Table 3: 700M).
  paper_1024  Table 3, 256 -> 1024: 192 channels, 2 res blocks, mult 1,1,2,2,4,4, linear schedule,
              BSR degradation: about 282M parameters (Table 3: 300M).
  karlo       Karlo's super_res_first / super_res_last (diffusers UNet2DModel): 320 channels,
              3 res blocks, additive timestep conditioning, epsilon only: about 692M parameters.
              Released weights load with unclip_jax.convert.diffusers.load_super_res(folder).
  tiny        for tests and runlocal: 32 channels, 2 levels, 32x32 targets from 8x8.
Both paper upsamplers train on random crops a quarter of the target size (crop_fraction 0.25)
and run at full size; plain epsilon loss (prediction_type may be 'v_prediction'); no guidance.
AdamW lr 1.2e-4 / 1.0e-4, EMA 0.9999, batch 1024 / 512 for 1M steps. Sampling: 27 / 15 DDIM
steps (Karlo: 7 steps).

Expected: paper sizes on the full data: the cascade's FID in Table 2 -- not reproduced here.
runlocal (tiny, 2-core CPU): a few seconds per step; a tiny upsampler trained on 8x8 crops
runs at 32x32 with a loss close to its crop loss (tests/test_decoder_stage.py prints by how much).
"""
import ml_collections

from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config

_COMMON = dict(image_channels=3, out_channels=3, groups=32, norm_eps=1e-5, scale_shift=True,
               resblock_updown=True, time_embed_dim=None, flip_sin_to_cos=True, freq_shift=0.0,
               dtype="float32", param_dtype="float32", remat=False)

SIZES = {
    "paper_256": dict(_COMMON, channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                      dropout=0.1),
    "paper_1024": dict(_COMMON, channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                       dropout=0.0),
    "karlo": dict(_COMMON, channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                  dropout=0.0, scale_shift=False),
    "tiny": dict(_COMMON, channels=32, channel_mult=(1, 2), num_res_blocks=1, groups=8,
                 dropout=0.0),
}
_DATA = {  # (low-res size, target size, schedule, degradation, lr, batch)
    "paper_256": (64, 256, "cosine", "blur", 1.2e-4, 1024),
    "paper_1024": (256, 1024, "linear", "bsr", 1.0e-4, 512),
    "karlo": (64, 256, "cosine", "blur", 1.2e-4, 1024),
    "tiny": (8, 32, "cosine", "blur", 1e-3, 4),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="paper_256", runlocal=False)
    size = "tiny" if arg.runlocal else arg.size
    if size not in SIZES:
        raise ValueError(f"Unknown upsampler size {size!r}; choose one of {', '.join(SIZES)}.")
    low, target, schedule, degradation, lr, batch = _DATA[size]
    c = ml_collections.ConfigDict()
    c.stage = "upsampler"
    c.seed = 0
    c.model = ml_collections.ConfigDict(SIZES[size])
    c.model_size = size
    c.low_res_size = low
    c.image_size = target
    c.crop_fraction = 0.25
    c.degradation = degradation
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule=schedule, num_train_steps=1000, prediction_type="epsilon",
        learned_variance=False))
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="ddim", steps={"paper_256": 27, "paper_1024": 15, "karlo": 7}.get(size, 10)))
    c.batch_size = batch
    c.total_steps = 20 if arg.runlocal else 1_000_000
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        warmup_steps=0 if arg.runlocal else 10_000, grad_clip_norm=1.0))
    c.ema_decay = 0.0 if arg.runlocal else 0.9999
    c.log_every = 1 if arg.runlocal else 500
    data = (dict(kind="tfds", tfds_name="shapes/tiny", data_dir="data/tfds") if arg.runlocal
            else dict(kind="webdataset"))  # --config.input.paths='["shards/*.tar"]'
    c.input = input_config(**data, image_size=target, low_res_size=low, context_length=0,
                           low_res_degradation=degradation)
    add_trainer_sections(c, checkpoint_every=10 if arg.runlocal else 10_000,
                         eval_every=10 if arg.runlocal else 10_000)
    return c
