"""Stage-1 latent targets: helper images through the model's own frozen vision tower, made into k vectors.

The features are what the language model would see for the image (vision tower + merger,
dimension = text hidden size). What the k targets are (`latent_target`, `LATENT_TARGETS`):
- "pooled" (the paper's): the helper image's n patch vectors split into k contiguous groups, each averaged;
- "centred": the pooled targets minus the running mean of every target seen so far in training (optionally
  divided by the running standard deviation, per dimension): what sets one image apart from the others,
  since pooled targets differ little between images (`TargetCentring`);
- "delta": the helper image's features minus the row's input image's at the same patches, then pooled:
  what the imagined image adds (a drawn path) and nothing the input already shows;
- "selected": the helper image's features at the k patches that change most from the input image, in patch
  order, not pooled at all.
"delta" and "selected" need the row's input image (its first) at the helper image's size.

Poolings:
- "drop_remainder" (the reference): groups of n // k patches, the last n % k patches dropped;
- "even": `torch.tensor_split` into k groups whose sizes differ by at most one, every patch kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.images import load_image
from ..errors import MirageError
from ..io import atomic_file
from ..models.families import family, vision_tower

POOLINGS = ("drop_remainder", "even")
LATENT_TARGETS = ("pooled", "centred", "delta", "selected")
REFERENCED_TARGETS = ("delta", "selected")  # need the row's input image beside each helper image
STATS_FILE = "latent_target_stats.safetensors"  # the running statistics of "centred", beside the settings


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


def select_changed(helper: torch.Tensor, reference: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(n, D) features of a helper image and its input image -> (k, D): the helper's features at the k patches
    whose features change most (L2), in patch order."""
    change = (helper.float() - reference.float()).norm(dim=-1)
    return helper[change.topk(latent_size).indices.sort().values]


def _check_target(target: str) -> str:
    if target not in LATENT_TARGETS:
        raise MirageError(f"unknown latent_target {target!r}; choose one of {', '.join(LATENT_TARGETS)}")
    return target


def image_targets(
    helper: torch.Tensor,
    reference: torch.Tensor | None,
    latent_size: int,
    pooling: str = "drop_remainder",
    target: str = "pooled",
) -> torch.Tensor:
    """The k targets of one helper image from its (n, D) features (and its input image's, for "delta" and
    "selected"). "centred" is "pooled" here: the trainer subtracts the running mean (`TargetCentring`)."""
    if _check_target(target) not in REFERENCED_TARGETS:
        return pool_helper_features(helper, latent_size, pooling)
    if reference is None or reference.shape != helper.shape:
        got = "no input image" if reference is None else f"{reference.shape[0]} visual tokens"
        raise MirageError(
            f"latent_target {target!r} compares each helper image with its row's input image patch by patch: "
            f"the helper image gives {helper.shape[0]} visual tokens and the input {got}; give both the same size"
        )
    if target == "delta":
        return pool_helper_features(helper - reference, latent_size, pooling)
    if helper.shape[0] < latent_size:
        pool_helper_features(helper, latent_size, pooling)  # the one message for too few patches
    return select_changed(helper, reference, latent_size)


@torch.no_grad()
def helper_latent_targets(
    model,
    vision: dict,
    latent_size: int,
    pooling: str = "drop_remainder",
    target: str = "pooled",
    reference: dict | None = None,
    reference_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets of a batch of helper images (`vision`: their image inputs, e.g. the processor's `pixel_values`
    and `image_grid_thw`; for "delta" and "selected", `reference`: the same for the input images they are compared
    with, and `reference_index`: which of those each helper image is compared with, default one per helper in
    order): (num_images * k, D), no gradient, each image encoded once."""
    fam = family(model)
    per_image = fam.image_features(model, vision)
    references = [None] * len(per_image)
    if reference is not None:
        references = fam.image_features(model, reference)
        if reference_index is not None:  # a row's input image is encoded once for all its helper images
            references = [references[i] for i in reference_index.tolist()]
    return torch.cat(
        [image_targets(f, r, latent_size, pooling, target) for f, r in zip(per_image, references)]
    ).detach()


class TargetCentring:
    """The running statistics of "centred" targets: the per-dimension mean (and, with `scale`, standard deviation)
    of every stage-1 target seen in training so far, this step's included, summed over all processes.

    Kept as float64 sums (count, sum, sum of squares), so updates merge exactly across processes and a resumed
    run continues them (`save` / `load`: `latent_target_stats.safetensors`, beside the settings)."""

    def __init__(self, scale: bool = False, eps: float = 1e-6):
        self.scale = scale
        self.eps = eps
        # float64 tensors on the targets' device (no host sync per step); None until the first update
        self.count: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def update(self, targets: torch.Tensor, reduce=None) -> None:
        """Add a batch of targets (slots, D); `reduce` sums a tensor over processes (accelerate's)."""
        x = targets.detach().double()
        sums = torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), x.pow(2).sum(0)])
        if reduce is not None:
            sums = reduce(sums)
        count, total, total_sq = sums[:1], sums[1 : 1 + x.shape[1]], sums[1 + x.shape[1] :]
        if self.sum is None:
            self.count, self.sum, self.sum_sq = count, total, total_sq
            return
        device = total.device
        self.count = self.count.to(device) + count
        self.sum = self.sum.to(device) + total
        self.sum_sq = self.sum_sq.to(device) + total_sq

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        """Per dimension, with Bessel's correction."""
        variance = (self.sum_sq / self.count - self.mean.pow(2)).clamp(min=0.0)
        return (variance * self.count / (self.count - 1.0).clamp(min=1.0)).sqrt()

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets centred (and scaled) by the statistics so far, in their own dtype."""
        if self.sum is None:
            raise MirageError("centred latent targets: no statistics yet (train on a batch first)")
        out = targets.double() - self.mean.to(targets.device)
        if self.scale:
            out = out / (self.std.to(targets.device) + self.eps)
        return out.to(targets.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "sum_sq": self.sum_sq}

    def save(self, folder) -> None:
        """Write the statistics into `folder` (atomically), if there are any."""
        if self.sum is None:
            return
        from safetensors.torch import save

        with atomic_file(Path(folder) / STATS_FILE, "wb") as f:
            f.write(save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}))

    def load(self, folder) -> bool:
        """Continue from the statistics saved in `folder`; False when it has none."""
        path = Path(folder) / STATS_FILE
        if not path.is_file():
            return False
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            self.count, self.sum, self.sum_sq = state["count"].reshape(1), state["sum"], state["sum_sq"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise MirageError(f"{path}: cannot read the centred targets' statistics ({exc})") from None
        return True


def reference_image(images: list, source: str):
    """The input image a row's helper images are compared with ("delta", "selected"): the row's first."""
    if not images:
        raise MirageError(
            f"{source}:images: latent_target 'delta' and 'selected' compare each helper image with the row's input "
            "image, and this row has none"
        )
    return images[0]


def helper_inputs(model, batch: dict, prefix: str = "helper_") -> dict | None:
    """The helper images' inputs of a collated batch (`helper_<key>`; `reference_<key>`: their input images), by
    the names the model takes."""
    keys = family(model).vision_keys
    if f"{prefix}{keys[0]}" not in batch:
        return None
    return {k: batch[f"{prefix}{k}"] for k in keys}


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
    target: str = "pooled",
):
    """Add a `latent_targets` column (one (k, D) list per helper image) computed once, cached by `datasets`.

    Epochs 2..N read the column instead of running the vision tower. The Arrow file is kept under
    `cache_dir` (default: the `datasets` cache) with a fingerprint of the helper images (paths,
    sizes, mtimes), the vision tower's weights, k and the pooling, so a later run reuses it.
    """
    import hashlib
    import os

    import datasets

    check_pooling(pooling)
    referenced = _check_target(target) in REFERENCED_TARGETS
    # "centred" caches the pooled targets: the running statistics belong to the training run, not the data
    kind = target if referenced else "pooled"
    h = hashlib.sha256(f"{_vision_fingerprint(model)}-{latent_size}-{pooling}-{kind}".encode())
    columns = [dataset["helper_images"], *([dataset["images"]] if referenced else [])]
    for paths in (p for column in columns for p in column):
        for p in paths:
            st = os.stat(p) if os.path.exists(p) else None
            h.update(f"{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    fingerprint = h.hexdigest()[:16]
    cache_dir = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "mirage_latent_targets")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fam = family(model)
    device = next(fam.vision_tower(model).parameters()).device

    def encode_images(paths, where):
        images = [load_image(p, source=where) for p in paths]
        enc = processor.image_processor(images=images, return_tensors="pt")
        return {k: enc[k].to(device) for k in fam.vision_keys}

    def encode(batch):
        out = []
        for i, (paths, source) in enumerate(zip(batch["helper_images"], batch["source"])):
            if not paths:
                out.append([])
                continue
            vision = encode_images(paths, f"{source}:helper_images")
            reference = index = None
            if referenced:
                reference = encode_images([reference_image(batch["images"][i], source)], f"{source}:images")
                index = torch.zeros(len(paths), dtype=torch.long)
            targets = helper_latent_targets(model, vision, latent_size, pooling, target, reference, index)
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
