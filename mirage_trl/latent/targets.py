"""Stage-1 latent targets: helper images through the model's own frozen vision tower, pooled to k vectors.

The features are what the language model would see for the image (vision tower + merger,
dimension = text hidden size). Their n patch vectors are split into k contiguous groups and each
group is averaged. Poolings:
- "drop_remainder" (the reference): groups of n // k patches, the last n % k patches dropped;
- "even": `torch.tensor_split` into k groups whose sizes differ by at most one, every patch kept.
"""

from __future__ import annotations

import torch

from ..data.images import load_image
from ..errors import MirageError
from ..models.families import family, vision_tower

POOLINGS = ("drop_remainder", "even")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise MirageError(f"unknown latent pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    return pooling


def pool_helper_features(
    features: torch.Tensor, latent_size: int, pooling: str = "drop_remainder"
) -> torch.Tensor:
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
    model, vision: dict, latent_size: int, pooling: str = "drop_remainder"
) -> torch.Tensor:
    """Pooled targets of a batch of helper images (`vision`: their image inputs, e.g. the processor's
    `pixel_values` and `image_grid_thw`): (num_images * k, D), no gradient, each image encoded once."""
    per_image = family(model).image_features(model, vision)
    return torch.cat([pool_helper_features(f, latent_size, pooling) for f in per_image]).detach()


def helper_inputs(model, batch: dict) -> dict | None:
    """The helper images' inputs of a collated batch (`helper_<key>`), by the names the model takes."""
    keys = family(model).vision_keys
    if f"helper_{keys[0]}" not in batch:
        return None
    return {k: batch[f"helper_{k}"] for k in keys}


def _vision_fingerprint(model) -> str:
    """A cheap identity of the vision tower's weights (name, shapes, a few sums): cache key material."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(getattr(getattr(model, "config", None), "_name_or_path", "")).encode())
    for name, p in vision_tower(model).named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(f"{float(p.detach().float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def precompute_latent_targets(
    dataset,
    model,
    processor,
    latent_size: int,
    pooling: str = "drop_remainder",
    batch_size: int = 16,
    cache_dir=None,
):
    """Add a `latent_targets` column (one (k, D) list per helper image) computed once, cached by `datasets`.

    Epochs 2..N read the column instead of running the vision tower. The Arrow file is kept under
    `cache_dir` (default: the `datasets` cache) with a fingerprint of the helper images (paths,
    sizes, mtimes), the vision tower's weights, k and the pooling, so a later run reuses it.
    """
    import hashlib
    import os
    from pathlib import Path

    import datasets

    check_pooling(pooling)
    h = hashlib.sha256(f"{_vision_fingerprint(model)}-{latent_size}-{pooling}".encode())
    for paths in dataset["helper_images"]:
        for p in paths:
            st = os.stat(p) if os.path.exists(p) else None
            h.update(f"{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    fingerprint = h.hexdigest()[:16]
    cache_dir = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "mirage_latent_targets")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fam = family(model)
    device = next(fam.vision_tower(model).parameters()).device

    def encode(batch):
        out = []
        for paths, source in zip(batch["helper_images"], batch["source"]):
            if not paths:
                out.append([])
                continue
            images = [load_image(p, source=f"{source}:helper_images") for p in paths]
            enc = processor.image_processor(images=images, return_tensors="pt")
            vision = {k: enc[k].to(device) for k in fam.vision_keys}
            targets = helper_latent_targets(model, vision, latent_size, pooling)
            out.append(targets.float().cpu().reshape(len(paths), latent_size, -1).tolist())
        return {"latent_targets": out}

    return dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        new_fingerprint=fingerprint,
        cache_file_name=str(cache_dir / f"latent_targets-{fingerprint}.arrow"),
        load_from_cache_file=True,
        desc="latent targets",
    )
