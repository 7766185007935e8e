"""Face identity network (facenet-pytorch InceptionResnetV1, 512-d embeddings) from a local
weights file, with differentiable face crops and MTCNN detection (its weights ship in the wheel)."""

from __future__ import annotations

import os
import pickle

import torch

from dclip_ray.errors import ConfigError, InputFileError

FACE_SIZE = 160
CROPS = ("celeba_hq", "full")
# The official identity-loss crop of an aligned 256x256 CelebA-HQ face, x[:, :, 35:223, 32:220],
# as fractions of the image (x1, y1, x2, y2).
_CELEBA_HQ_BOX = (32 / 256, 35 / 256, 220 / 256, 223 / 256)
_WEIGHTS_HINT = (
    "a facenet-pytorch InceptionResnetV1 state dict such as 20180402-114759-vggface2.pt or "
    "20180408-102900-casia-webface.pt from github.com/timesler/facenet-pytorch/releases"
)


class FaceIdentity:
    """Frozen InceptionResnetV1 (eval, requires_grad False) + lazy MTCNN.

    ``embed(x: [B,3,H,W] in [-1,1], boxes=None) -> [B,512]`` L2-normalised, differentiable in x;
    ``detect(images) -> boxes [B,4]`` (x1, y1, x2, y2 pixels; NaN rows where no face was found).
    """

    def __init__(self, net: torch.nn.Module, crop: str = "celeba_hq"):
        if crop not in CROPS:
            raise ConfigError(f"unknown face crop {crop!r}: choose one of {', '.join(CROPS)}")
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.crop = crop
        self._mtcnn = None

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters."""
        return next(self.net.parameters()).device

    def default_boxes(self, batch: int, height: int, width: int) -> torch.Tensor:
        """``[batch,4]`` pixel boxes of the fixed crop (the CelebA-HQ crop or the whole image)."""
        fx1, fy1, fx2, fy2 = _CELEBA_HQ_BOX if self.crop == "celeba_hq" else (0.0, 0.0, 1.0, 1.0)
        box = torch.tensor([fx1 * width, fy1 * height, fx2 * width, fy2 * height], dtype=torch.float32)
        return box.expand(batch, 4).clone()

    def crop_faces(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B,3,H,W] in [-1,1]`` -> ``[B,3,160,160]`` face crops in [-1,1] (bilinear roi-align,
        differentiable). ``boxes``: ``[B,4]`` pixels; None or NaN rows use the fixed crop."""
        from torchvision.ops import roi_align

        b, _, h, w = x.shape
        default = self.default_boxes(b, h, w).to(x.device)
        if boxes is None:
            boxes = default
        else:
            boxes = boxes.to(device=x.device, dtype=torch.float32)
            bad = torch.isnan(boxes).any(dim=1, keepdim=True)
            boxes = torch.where(bad, default, boxes)
        rois = torch.cat([torch.arange(b, device=x.device, dtype=torch.float32)[:, None], boxes], dim=1)
        return roi_align(x, rois.to(x.dtype), output_size=(FACE_SIZE, FACE_SIZE), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def embed(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B,3,H,W] in [-1,1]`` -> ``[B,512]`` L2-normalised identity embeddings; gradients
        flow to ``x``. facenet's input standardisation (p*255 - 127.5) / 128 for p in [0, 1]
        equals ``x * 127.5 / 128``."""
        faces = self.crop_faces(x.to(self.device), boxes)
        return self.net(faces * (127.5 / 128.0))

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        """``images: [B,3,H,W] in [-1,1]`` -> ``[B,4]`` most confident face box per image
        (x1, y1, x2, y2 in pixels; NaN where MTCNN finds no face). No gradient."""
        if self._mtcnn is None:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(image_size=FACE_SIZE, device=torch.device("cpu"))
        arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).numpy()
        out = torch.full((len(arr), 4), float("nan"))
        for i, img in enumerate(arr):
            found, probs = self._mtcnn.detect(img)
            if found is not None and len(found):
                best = int(max(range(len(probs)), key=lambda j: probs[j]))
                out[i] = torch.tensor([float(v) for v in found[best][:4]])
        return out


def load_face(weights: str | None, crop: str = "celeba_hq", device: str | torch.device = "cpu") -> FaceIdentity:
    """A frozen :class:`FaceIdentity` from a local InceptionResnetV1 state dict (VGGFace2 or
    CASIA-WebFace; the classifier ``logits.*`` keys are ignored). ``crop``: 'celeba_hq' (the fixed
    crop of an aligned 256 face, scaled to the image size) or 'full'.

    Raises ConfigError when ``weights`` is None, InputFileError for a missing / unreadable / wrong file.
    """
    if weights is None:
        raise ConfigError(f"the face loss needs --face-weights PATH: {_WEIGHTS_HINT} (or set the id weight to 0)")
    if not os.path.isfile(weights):
        raise InputFileError(f"face weights {weights}: no such file; expected {_WEIGHTS_HINT}")
    from facenet_pytorch import InceptionResnetV1

    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputFileError(f"face weights {weights}: not a readable state dict ({type(e).__name__}); expected {_WEIGHTS_HINT}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InputFileError(f"face weights {weights}: not a state dict; expected {_WEIGHTS_HINT}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.removeprefix("module.").startswith("logits.")}
    net = InceptionResnetV1(pretrained=None, classify=False)
    result = net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise InputFileError(
            f"face weights {weights} do not fit InceptionResnetV1: {len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {bad}); expected {_WEIGHTS_HINT}"
        )
    return FaceIdentity(net.to(device), crop=crop)
