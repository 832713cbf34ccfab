"""The stages the trainer can run, by the name a config gives in ``config.stage``."""
from __future__ import annotations

from unclip_jax.errors import UserError
from unclip_jax.train import (ar_prior_stage, clip_stage, decoder_stage, diffusion_prior_stage,
                              upsampler_stage)
from unclip_jax.train.stage import Stage


class StageError(UserError, ValueError):
    """An unknown stage or a config the stage cannot use."""


STAGES: dict[str, Stage] = {s.name: s for s in (
    diffusion_prior_stage.STAGE, ar_prior_stage.STAGE, decoder_stage.STAGE, upsampler_stage.STAGE,
    clip_stage.STAGE)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise StageError(f"Unknown stage {name!r} (config.stage); known stages: "
                         f"{', '.join(STAGES)}.")
    return STAGES[name]
