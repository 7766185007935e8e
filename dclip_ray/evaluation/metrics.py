"""Evaluation metrics of an edit (the official code shipped none): pure functions over image tensors.

All images are ``[B,3,H,W]`` float in [-1,1] (``before`` = the input, ``after`` = the edit); per-image
metrics return ``[B]`` tensors. Learned metrics take their network as an argument (nothing is
downloaded): a CLIP from :func:`dclip_ray.models.load_clip` (any CLIP, not only the one used for
training), a face model from :func:`dclip_ray.models.load_face`, an Inception weights file for FID/KID.

- PSNR (dB, ``10 log10(range^2 / MSE)`` with range 2 for [-1,1]; ``inf`` for identical images) and SSIM
  (torchmetrics, Gaussian window 11, sigma 1.5);
- directional CLIP similarity ``S_dir = cos(E_I(after) - E_I(before), dT(source -> target))`` in
  [-1, 1] (the quantity the directional loss of eq. 9 drives up; ``1 - L_direction``);
- CLIP score ``cos(E_I(after), E_T(target))`` in [-1, 1];
- identity similarity ``<f(after), f(before)>`` of normalised face embeddings, in [-1, 1];
- the toy world's judge success (colour/shape read from pixels, no learned network);
- FID / KID (torchmetrics + torch-fidelity's InceptionV3, weights from a local file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from dclip_ray.errors import ConfigError, InputFileError

DATA_RANGE = 2.0
"""Value range of images in [-1, 1]."""


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ConfigError(f"{what}: images must both be [B,3,H,W] of the same shape, got {tuple(a.shape)} and "
                          f"{tuple(b.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, [B] in dB: ``10 log10(data_range^2 / mean((x - y)^2))``.

    ``x``, ``y``: [B,C,H,W] in [-1,1] (``data_range`` 2); identical images give ``inf``.
    """
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Structural similarity per image, [B] in [-1, 1] (1 = identical): torchmetrics' SSIM with an
    11-pixel Gaussian window (sigma 1.5); ``x``, ``y``: [B,C,H,W] in [-1,1]."""
    _check_pair(x, y, "ssim")
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x.float(), y.float(), data_range=data_range, reduction="none")


@torch.no_grad()
def directional_similarity(clip: Any, before: torch.Tensor, after: torch.Tensor, source: str, target: str,
                           ) -> torch.Tensor:
    """``S_dir`` per image, [B] in [-1, 1]: cosine between the image change ``E_I(after) - E_I(before)`` and
    the template-averaged text direction ``source -> target`` of ``clip`` (0 when the image is unchanged)."""
    _check_pair(before, after, "directional similarity")
    d_img = clip.encode_image(after) - clip.encode_image(before)
    d_img = d_img / (d_img.norm(dim=-1, keepdim=True) + 1e-7)
    return (d_img * clip.text_direction(source, target).to(d_img)).sum(-1).cpu()


@torch.no_grad()
def clip_score(clip: Any, images: torch.Tensor, text: str) -> torch.Tensor:
    """CLIP score per image, [B] in [-1, 1]: ``cos(E_I(images), E_T(text))`` (text averaged over templates)."""
    return (clip.encode_image(images) * clip.text_embedding(text).to(images.device)).sum(-1).cpu()


@torch.no_grad()
def identity_similarity(face: Any, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Face identity similarity per image, [B] in [-1, 1]: ``<f(after), f(before)>`` with ``face.embed``
    (normalised 512-d embeddings); 1 = the same identity embedding."""
    _check_pair(before, after, "identity similarity")
    return (face.embed(after) * face.embed(before)).sum(-1).cpu()


def judge_success(
    images: torch.Tensor,
    colour: str | Sequence[str] | None = None,
    shape: str | Sequence[str] | None = None,
) -> list[bool]:
    """The toy world's judge (pixels, no network) per image, by its one success rule
    (:meth:`~dclip_ray.toyworld.judge.JudgeResult.success`: one toy shape in a palette colour, equal to
    ``colour`` / ``shape`` when given; one value for all images or one per image). ``images``:
    [B,3,H,W] in [-1,1] or uint8 [B,H,W,3]."""
    from dclip_ray.toyworld import judge_batch

    n = len(images)

    def per_image(v: str | Sequence[str] | None) -> list[str | None]:
        if v is None or isinstance(v, str):
            return [v] * n
        if len(v) != n:
            raise ConfigError(f"judge: {len(v)} expected labels for {n} images")
        return list(v)

    colours, shapes = per_image(colour), per_image(shape)
    return [bool(r.success(c, s)) for r, c, s in zip(judge_batch(images), colours, shapes, strict=True)]


def load_inception(weights: str | None, feature: int = 2048) -> torch.nn.Module:
    """The FID InceptionV3 (torch-fidelity's port of the TF graph, via torchmetrics) from a local weights
    file (``pt_inception-2015-12-05-6726825d.pth``); ConfigError / InputFileError name the fix."""
    if not weights:
        raise ConfigError("FID/KID need --inception-weights PATH: the FID InceptionV3 weights "
                          "(pt_inception-2015-12-05-6726825d.pth from torch-fidelity's releases); nothing is downloaded")
    if not os.path.isfile(weights):
        raise InputFileError(f"Inception weights {weights}: no such file; give the local FID InceptionV3 .pth file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputFileError(f"Inception weights {weights}: not a readable state dict ({type(e).__name__}); give "
                             "the FID InceptionV3 .pth file") from None
    if not isinstance(state, dict) or not any(str(k).startswith("Conv2d_1a_3x3") for k in state):
        raise InputFileError(f"Inception weights {weights}: not FID InceptionV3 weights (no Conv2d_1a_3x3 keys); "
                             "give pt_inception-2015-12-05-6726825d.pth")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise ConfigError("FID/KID need torchmetrics and torch-fidelity: pip install torchmetrics torch-fidelity") from None
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                 feature_extractor_weights_path=weights)
    except ModuleNotFoundError:
        raise ConfigError("FID/KID need torch-fidelity: pip install torch-fidelity") from None
    except RuntimeError as e:
        raise InputFileError(f"Inception weights {weights} do not fit InceptionV3: {str(e).splitlines()[0][:200]}") from None
    return net


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _Precomputed(torch.nn.Module):
    """Feature "extractor" that returns its input: the Inception features are computed once and fed to
    both torchmetrics metrics (each would otherwise run the network again)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N,F] in, features out."""
        return x


@torch.no_grad()
def inception_features(images: torch.Tensor, net: torch.nn.Module, batch_size: int = 32) -> torch.Tensor:
    """FID InceptionV3 features [N,F] of images [N,3,H,W] in [-1,1] (uint8-quantised, resized to 299 inside)."""
    return torch.cat([net(_uint8(images[i : i + batch_size])).reshape(min(batch_size, images.shape[0] - i), -1)
                      for i in range(0, images.shape[0], batch_size)]).double()


@torch.no_grad()
def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    inception_weights: str | torch.nn.Module | None,
    feature: int = 2048,
    kid_subset_size: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """FID and KID (mean, std) between two image sets ([N,3,H,W] in [-1,1]; sizes may differ) with
    torchmetrics and the FID InceptionV3 loaded from the local file ``inception_weights`` (or a network
    from :func:`load_inception`).

    Returns ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake"}``. Both need many images to mean anything
    (FID is biased for small N; thousands are usual); ``kid_subset_size`` defaults to
    ``min(N_real, N_fake, 1000)``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ConfigError(f"FID/KID need at least 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    net = (inception_weights if isinstance(inception_weights, torch.nn.Module)
           else load_inception(inception_weights, feature))
    f_real, f_fake = inception_features(real, net, batch_size), inception_features(fake, net, batch_size)
    subset = kid_subset_size or min(real.shape[0], fake.shape[0], 1000)
    fid = FrechetInceptionDistance(feature=_Precomputed(f_real.shape[1])).double()
    kid = KernelInceptionDistance(feature=_Precomputed(f_real.shape[1]), subset_size=subset)
    for f, is_real in ((f_real, True), (f_fake, False)):
        fid.update(f, real=is_real)
        kid.update(f, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "std", "min", "max", "n"}`` over the finite values (an identical-image PSNR of inf is
    counted in ``n_inf`` instead)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    out: dict[str, float | int] = {"n": len(finite)}
    n_inf = sum(1 for v in values if math.isinf(float(v)))
    if n_inf:
        out["n_inf"] = n_inf
    if finite:
        t = torch.tensor(finite, dtype=torch.float64)
        out.update(mean=float(t.mean()), std=float(t.std(unbiased=False)), min=float(t.min()), max=float(t.max()))
    return out
