"""Training. Every stage is a loss function driven by one shared update step.

  step.py                  TrainState, make_train_step (pure; the trainer jits and shards it)
  diffusion_prior_stage.py the diffusion prior: x0 MSE, text dropped for guidance
  ar_prior_stage.py        the AR prior: quantiser fit, cross-entropy on bucket tokens
  decoder_stage.py         the decoder (hybrid loss, learned variance) and the upsamplers (crops)

The full trainer (data, mesh, checkpoints, the loop) arrives with the data/trainer issue.
"""
