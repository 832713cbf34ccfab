"""Training. Every stage is a loss function (and a few hooks) driven by one shared update step.

  trainer.py               train(config, workdir): mesh, sharded state, resume, input, the loop
  step.py                  TrainState, make_train_step (pure, with gradient accumulation)
  stage.py                 Stage (what the trainer knows of a stage) and helpers stages share
  registry.py              the stages by config name (get_stage)
  clip_stage.py            CLIP from scratch: the contrastive loss
  diffusion_prior_stage.py the diffusion prior: x0 MSE, text dropped for guidance
  ar_prior_stage.py        the AR prior: quantiser fit, cross-entropy on bucket tokens
  decoder_stage.py         the decoder: hybrid loss (learned variance), z_i and text dropped
  upsampler_stage.py       the upsamplers: epsilon / v loss on random crops
  optimizer.py, sharding.py, checkpoint.py, inputs.py, metrics.py, distributed.py, export.py
"""
