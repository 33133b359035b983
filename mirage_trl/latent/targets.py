"""Stage-1 latent targets: helper images through the model's own frozen vision tower, pooled to k vectors.

The features are what the language model would see for the image (vision tower + merger,
dimension = text hidden size). Their n patch vectors are split into k contiguous groups and each
group is averaged. Poolings:
- "drop_remainder" (the reference): groups of n // k patches, the last n % k patches dropped;
- "even": `torch.tensor_split` into k groups whose sizes differ by at most one, every patch kept.
"""

from __future__ import annotations

import torch

from ..errors import MirageError
from .model_utils import multimodal_model

POOLINGS = ("drop_remainder", "even")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise MirageError(f"unknown latent pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    return pooling


def pool_helper_features(features: torch.Tensor, latent_size: int, pooling: str = "drop_remainder") -> torch.Tensor:
    """(n, D) patch features of one image -> (k, D) pooled targets."""
    check_pooling(pooling)
    n = features.shape[0]
    if n < latent_size:
        raise MirageError(
            f"a helper image gives {n} visual tokens, fewer than latent_size={latent_size}; "
            "use larger helper images or a smaller latent_size"
        )
    if pooling == "drop_remainder":
        group = n // latent_size
        return features[: group * latent_size].reshape(latent_size, group, -1).mean(dim=1)
    return torch.stack([g.mean(dim=0) for g in torch.tensor_split(features, latent_size)])


@torch.no_grad()
def helper_latent_targets(
    model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, latent_size: int, pooling: str = "drop_remainder"
) -> torch.Tensor:
    """Pooled targets of a batch of helper images: (num_images * k, D), no gradient, each image encoded once."""
    mm = multimodal_model(model)
    out = mm.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    per_image = out.pooler_output
    if isinstance(per_image, torch.Tensor):  # some versions return one concatenated tensor
        sizes = (image_grid_thw.prod(-1) // mm.visual.spatial_merge_size**2).tolist()
        per_image = torch.split(per_image, sizes)
    return torch.cat([pool_helper_features(f, latent_size, pooling) for f in per_image]).detach()
