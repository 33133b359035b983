"""Latent analysis: are the generated latents closer to the image-feature space or to the text-embedding space?

For a set of rows: decode with `generate_with_latents(..., return_latents=True)` (latent mode "model"),
collect every latent vector fed; encode the rows' input and helper images with the model's own vision
tower + merger (the features the language model sees for an image, one per visual token); take the
text-embedding space as the rows of the input embedding matrix. Figures, per space:

(text space: the embedding rows of the tokenizer's vocabulary, all-zero rows left out)

* `nn_cosine`: mean over latents of the cosine to the nearest vector of the space;
* `centroid_cosine`: mean over latents of the cosine to the space's centroid (mean vector);
* `latent_centroid_cosine`: cosine between the latents' centroid and the space's centroid.

The 2-D projection (as the paper's figure): PCA of the unit-normalised vectors, fitted on the three sets together (text embeddings
subsampled to `max_text_points`), drawn with PIL (no matplotlib needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.images import load_image
from .errors import MirageError
from .evaluation import _model_device, _progress, prompt_encoder
from .generation import generate_with_latents
from .io import save_figure
from .models.families import family, text_model

COLORS = {"text embeddings": (150, 150, 150), "image features": (31, 119, 180), "latents": (214, 39, 40)}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def space_stats(latents: torch.Tensor, space: torch.Tensor, chunk: int = 8192) -> dict:
    """Cosine figures of (N, D) latents against an (M, D) space (see the module doc)."""
    if latents.numel() == 0 or space.numel() == 0:
        raise MirageError("latent analysis needs at least one latent and one vector of each space")
    best = torch.full((latents.shape[0],), -2.0, dtype=torch.float64)
    for start in range(0, space.shape[0], chunk):
        best = torch.maximum(best, _cos(latents, space[start : start + chunk]).amax(dim=1))
    centroid = space.double().mean(dim=0, keepdim=True)
    return {
        "nn_cosine": float(best.mean()),
        "centroid_cosine": float(_cos(latents, centroid).mean()),
        "latent_centroid_cosine": float(_cos(latents.double().mean(dim=0, keepdim=True), centroid)[0, 0]),
        "size": int(space.shape[0]),
    }


def pca_2d(sets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Project every set on the first two principal components of all of them together."""
    allv = torch.cat([v.double() for v in sets.values()])
    mean = allv.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(allv - mean, full_matrices=False)
    basis = vh[:2].T
    return {k: (v.double() - mean) @ basis for k, v in sets.items()}


def draw_projection(points: dict[str, torch.Tensor], path, lines: list[str]) -> None:
    """`projection.png` (matplotlib): the latents among the image features and the text embeddings on the
    first two principal components of all three (left), and the latents alone on their own (right), so
    latents that collapsed to one point show as one, with the spread written in the title."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    latents = points.get("latents")
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 6.4), gridspec_kw={"bottom": 0.12 + 0.025 * len(lines), "wspace": 0.3}
    )
    for name, pts in points.items():  # latents drawn last, on top
        color = tuple(c / 255 for c in COLORS.get(name, (0, 0, 0)))
        size = 14 if name == "latents" else 5
        axes[0].scatter(
            pts[:, 0], pts[:, 1], s=size, color=color, alpha=0.7, label=f"{name} ({pts.shape[0]})"
        )
    axes[0].set(title="joint PCA of the three sets", xlabel="PC 1", ylabel="PC 2")
    axes[0].legend(loc="best", fontsize=8)
    if latents is not None and latents.shape[0] >= 2:
        own = pca_2d({"latents": latents})["latents"]
        spread = float(own.norm(dim=-1).max())
        axes[1].scatter(own[:, 0], own[:, 1], s=14, color=tuple(c / 255 for c in COLORS["latents"]))
        axes[1].set(title=f"latents alone (their own PCA)\nlargest distance from their mean: {spread:.3g}")
    else:
        axes[1].text(
            0.5, 0.5, "fewer than two latents", ha="center", va="center", transform=axes[1].transAxes
        )
        axes[1].set(title="latents alone")
    axes[1].set(xlabel="PC 1", ylabel="PC 2")
    axes[1].ticklabel_format(style="sci", scilimits=(-3, 3))
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=8, family="monospace", va="bottom")
    save_figure(fig, path, dpi=100)
    plt.close(fig)


@dataclass
class LatentAnalysis:
    stats: dict  # {"image features": {...}, "text embeddings": {...}, "num_latents", ...}
    latents: torch.Tensor  # (N, D)
    image_features: torch.Tensor  # (M, D)
    text_embeddings: torch.Tensor  # (V, D), the full embedding matrix
    projection: dict  # name -> (n, 2)


@torch.no_grad()
def image_features(model, processor, paths: list[str], batch_size: int = 16) -> torch.Tensor:
    """Vision tower + merger features (one row per visual token) of the images at `paths`."""
    fam = family(model)
    dtype = next(fam.vision_tower(model).parameters()).dtype
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p, source="images") for p in paths[start : start + batch_size]]
        enc = processor.image_processor(images=images, return_tensors="pt")
        vision = {k: enc[k].to(device) for k in fam.vision_keys}
        vision["pixel_values"] = vision["pixel_values"].to(dtype)
        feats.extend(fam.image_features(model, vision))
    return torch.cat([f.float().cpu() for f in feats])


def analyze_latents(
    model,
    processor,
    rows,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 42,
    max_text_points: int = 2000,
    progress: bool = False,
) -> LatentAnalysis:
    rows = list(rows)
    if not rows:
        raise MirageError("latent analysis needs at least one row")
    encoder = prompt_encoder(processor)
    device = _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = []
    for start in _progress(range(0, len(rows), batch_size), progress, "decoding"):
        chunk = rows[start : start + batch_size]
        batch = encoder.prompt_batch(chunk)
        out = generate_with_latents(
            model, processor, {k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator, return_latents=True,
        )  # fmt: skip
        latents.extend(x.float().cpu() for x in (out.latents or []) if x.shape[0])
    if not latents:
        raise MirageError(
            f"no latent was generated for {len(rows)} row(s) within {max_new_tokens} new tokens: the model never "
            "emitted <|latent_start|> (is it a Mirage-trained model with latent tokens?)"
        )
    lat = torch.cat(latents)
    paths = [p for r in rows for p in list(r.get("images") or []) + list(r.get("helper_images") or [])]
    if not paths:
        raise MirageError("latent analysis needs rows with input or helper images")
    img = image_features(model, processor, paths, batch_size)
    # The vocabulary's rows only (no spare rows past the tokenizer), without all-zero rows (padding).
    tok = getattr(processor, "tokenizer", processor)
    text = text_model(model).embed_tokens.weight.detach().float().cpu()[: len(tok)]
    text = text[text.norm(dim=-1) > 0]
    stats = {
        "num_rows": len(rows),
        "num_latents": int(lat.shape[0]),
        "num_images": len(paths),
        "image features": space_stats(lat, img),
        "text embeddings": space_stats(lat, text),
    }
    stats["closer_to"] = (
        "image features"
        if stats["image features"]["nn_cosine"] >= stats["text embeddings"]["nn_cosine"]
        else "text embeddings"
    )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(text.shape[0], generator=g)[:max_text_points]
    img_pick = torch.randperm(img.shape[0], generator=g)[:max_text_points]
    unit = torch.nn.functional.normalize  # directions, as the cosine figures measure
    projection = pca_2d({"text embeddings": unit(text[pick], dim=-1), "image features": unit(img[img_pick], dim=-1),
                         "latents": unit(lat, dim=-1)})  # fmt: skip
    return LatentAnalysis(stats, lat, img, text, projection)


def summary_lines(stats: dict) -> list[str]:
    lines = [f"{stats['num_latents']} latents from {stats['num_rows']} rows; {stats['num_images']} images"]
    for space in ("image features", "text embeddings"):
        s = stats[space]
        lines.append(
            f"{space:>15}: nearest-neighbour cos {s['nn_cosine']:.3f}, cos to centroid {s['centroid_cosine']:.3f}, "
            f"centroid-centroid cos {s['latent_centroid_cosine']:.3f} (n={s['size']})"
        )
    return lines
