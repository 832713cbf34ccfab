"""Helpers shared by the parity tests: torch reference models with every parameter random.

diffusers and transformers initialise several parameters to zero or one (output convolutions,
norm scales, the prior's prd token, clip_mean / clip_std); a parity test on those defaults would
not see a wrong mapping of them, so every parameter is replaced here.
"""
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
