"""Training: the generic update step every stage shares (step.py); the stages' loss functions
(priors, decoder, upsamplers) live beside it. The full trainer (data, mesh, checkpoints, loop)
arrives with the data/trainer issue and drives these."""
