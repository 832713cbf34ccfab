"""CLIP's text tower and text projection alone (transformers' ``CLIPTextModelWithProjection``)."""
from __future__ import annotations

from flax import nnx

from unclip_jax.clip.model import CLIPConfig, TextTransformer, _dense


class CLIPTextEncoder(nnx.Module):
    """The text side of :class:`unclip_jax.clip.model.CLIP`: what a diffusers UnCLIPPipeline
    ships as its text encoder (pipeline-folder class 'CLIPText'). Parameter paths equal the text
    side of CLIP (``text.*``, ``text_projection.kernel``), so the Hugging Face name map applies."""

    def __init__(self, config: CLIPConfig, rngs: nnx.Rngs):
        self.config = config
        self.text = TextTransformer(config, rngs)
        self.text_projection = _dense(config.text_width, config.embed_dim, ("embed", None),
                                      config.text_width ** -0.5, config, rngs, bias=False)

    def encode_text(self, token_ids, attention_mask=None):
        """token_ids [B, L] -> (text_embeds [B, D], last_hidden [B, L, W]) as CLIP's."""
        pooled, hidden = self.text(token_ids, attention_mask)
        return self.text_projection(pooled), hidden
