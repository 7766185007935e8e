"""Train and evaluate the toy world's tiny CLIP (an open_clip ViT, config ``toy-clip-vit``).

Training is contrastive over captions: each step encodes a batch of fresh renders and the whole
caption set (every colour x shape, plus the hard-negative captions below, all in one randomly drawn
prompt template) and minimises the cross-entropy of each image against all captions (InfoNCE with
the full caption set as negatives). To make the model hard to fool when it guides an edit:

- augmentations: shifts of up to 2 pixels, Gaussian pixel noise (std up to 0.12 on [0,1]), slight
  blur, colour/brightness jitter, background grey-level jitter;
- hard negatives: two-coloured shapes (split by a random line) captioned ``"a red and blue circle"``,
  and irregular blobs (rejected unless the judge also calls them "blob") captioned ``"a red blob"``;
  a half-recoloured circle is therefore not a "blue circle", and a destroyed shape is not a "square".

:func:`evaluate_clip` measures held-out zero-shot accuracy and how much probability the model gives
"a blue circle" for half-red/half-blue circles and noisy red circles, and the success rate of a
small PGD attack that pushes red circles towards "blue circle".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dclip_ray.errors import ConfigError

from .judge import classify_shape, judge
from .render import BACKGROUND, COLOURS, SHAPES, SIZE, coverage, sample_dataset, sample_params

TEMPLATES: tuple[str, ...] = (
    "a {}",
    "{}",
    "a photo of a {}.",
    "a picture of the {}",
    "an image of a {}.",
    "a rendering of a {}",
    "a {} on a grey background",
    "a drawing of a {}.",
)
"""Prompt templates drawn during training (the zero-shot evaluation uses ``"a {}"``)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def class_phrases() -> list[str]:
    """The colour x shape phrases, colour-major: ``["red circle", "red square", ...]``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def hard_negative_phrases() -> list[str]:
    """Two-colour phrases (palette order, ``"red and blue circle"``) then blob phrases (``"red blob"``)."""
    names = list(COLOURS)
    pairs = [
        f"{a} and {b} {s}" for i, a in enumerate(names) for b in names[i + 1 :] for s in SHAPES
    ]
    return pairs + [f"{c} blob" for c in names]


POSITIONS: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the centre", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
"""Where a shape's centre lies on a 3 x 3 grid (row-major), for the position captions."""


def position_index(cx: float, cy: float, size: int = SIZE) -> int:
    """Index into :data:`POSITIONS` of a shape centred at ``(cx, cy)`` (pixels): the middle band is
    ``size/2 +- size/12`` wide on each axis (centres lie in about [8, 24] on a 32-pixel image)."""
    lo, hi = size / 2 - size / 12, size / 2 + size / 12
    col = 0 if cx < lo else (2 if cx > hi else 1)
    row = 0 if cy < lo else (2 if cy > hi else 1)
    return 3 * row + col


def position_phrases() -> list[str]:
    """Colour x shape x position phrases, ``"red circle in the top left"`` (class-major)."""
    return [f"{p} {pos}" for p in class_phrases() for pos in POSITIONS]


def all_phrases() -> list[str]:
    """Every phrase the model is trained on: class phrases first, then the hard negatives."""
    return class_phrases() + hard_negative_phrases()


@dataclass
class CLIPTrainConfig:
    """Hyper-parameters of :func:`train_clip` (recorded in the model card)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    two_colour_fraction: float = 0.2
    blob_fraction: float = 0.2
    max_noise: float = 0.12
    blob_pool_size: int = 1500
    position_weight: float = 0.0
    init: str | None = None
    seed: int = 0
    threads: int = 2


def _background(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.7:
        return np.asarray(BACKGROUND, dtype=np.float32)
    grey = rng.uniform(90, 170)
    return (grey + rng.uniform(-8, 8, size=3)).astype(np.float32)


def render_two_colour(
    colour_a: str, colour_b: str, shape: str, rng: np.random.Generator, fraction: float | None = None
) -> np.ndarray:
    """A shape split by a random straight line into ``colour_a`` and ``colour_b``: uint8 ``[H,W,3]``.

    ``fraction`` (optional) fixes the line through the centre at a random angle (0.5 = half/half).
    """
    params = sample_params(rng)
    cov = coverage(shape, params)[..., None]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    theta = rng.uniform(0, 2 * np.pi)
    offset = 0.0 if fraction is not None else rng.uniform(-0.4, 0.4) * params.r
    side = ((xx - params.cx) * np.cos(theta) + (yy - params.cy) * np.sin(theta) - offset) > 0
    fg = np.where(side[..., None], np.asarray(COLOURS[colour_a], np.float32), np.asarray(COLOURS[colour_b], np.float32))
    bg = np.asarray(BACKGROUND, np.float32) if fraction is not None else _background(rng)
    return np.rint(cov * fg + (1 - cov) * bg).clip(0, 255).astype(np.uint8)


def blob_coverage(rng: np.random.Generator, max_tries: int = 20) -> np.ndarray:
    """Coverage float32 ``[H,W]`` of an irregular blob (union of 3-5 discs) whose shape features match
    no circle, square or triangle prototype of the judge (up to ``max_tries`` draws)."""
    sup = 4
    n = SIZE * sup
    coords = (np.arange(n, dtype=np.float32) + 0.5) / sup
    y, x = np.meshgrid(coords, coords, indexing="ij")
    red = np.asarray(COLOURS["red"], np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    cov = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(max_tries):
        cx, cy = rng.uniform(10, 22, size=2)
        inside = np.zeros((n, n), dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(2.0, 5.0)
            px, py = cx + rng.uniform(-6, 6), cy + rng.uniform(-6, 6)
            inside |= (x - px) ** 2 + (y - py) ** 2 <= r * r
        cov = inside.reshape(SIZE, sup, SIZE, sup).mean(axis=(1, 3)).astype(np.float32)
        image = np.rint(cov[..., None] * red + (1 - cov[..., None]) * bg).astype(np.uint8)
        r = judge(image)
        if r.shape != "none" and classify_shape(r.fill_ratio, r.v_offset) == "blob":
            break
    return cov


def render_blob(colour: str, rng: np.random.Generator, cov: np.ndarray | None = None) -> np.ndarray:
    """A ``colour`` blob (``cov`` from :func:`blob_coverage`, drawn when None): uint8 ``[H,W,3]``."""
    cov = blob_coverage(rng) if cov is None else cov
    fg = np.asarray(COLOURS[colour], np.float32)
    return np.rint(cov[..., None] * fg + (1 - cov[..., None]) * _background(rng)).clip(0, 255).astype(np.uint8)


def training_batch(
    rng: np.random.Generator,
    n: int,
    cfg: CLIPTrainConfig,
    phrases: list[str],
    blob_pool: list[np.ndarray] | None = None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` training images: ``(uint8 [n,H,W,3], caption index int64 [n])`` into ``phrases``.

    Blobs come from ``blob_pool`` (coverages, reused with a random flip/transpose) when given. When
    ``positions`` (int64 ``[n]``) is given it receives each single-colour shape's index into
    :func:`position_phrases` (-1 for two-colour shapes and blobs).
    """
    names = list(COLOURS)
    index = {p: i for i, p in enumerate(phrases)}
    class_index = {p: i for i, p in enumerate(class_phrases())}
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    targets = np.empty(n, dtype=np.int64)
    if positions is not None:
        positions[:] = -1
    for i in range(n):
        u = rng.random()
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if u < cfg.two_colour_fraction:
            a, b = sorted(rng.choice(len(names), size=2, replace=False))
            images[i] = render_two_colour(names[a], names[b], shape, rng)
            targets[i] = index[f"{names[a]} and {names[b]} {shape}"]
        elif u < cfg.two_colour_fraction + cfg.blob_fraction:
            colour = names[int(rng.integers(len(names)))]
            cov = None
            if blob_pool:
                cov = blob_pool[int(rng.integers(len(blob_pool)))]
                cov = np.rot90(cov, int(rng.integers(4))) if rng.random() < 0.5 else cov
            images[i] = render_blob(colour, rng, cov)
            targets[i] = index[f"{colour} blob"]
        else:
            colour = names[int(rng.integers(len(names)))]
            params = sample_params(rng)
            cov = coverage(shape, params)[..., None]
            fg = np.asarray(COLOURS[colour], np.float32)
            images[i] = np.rint(cov * fg + (1 - cov) * _background(rng)).clip(0, 255).astype(np.uint8)
            targets[i] = index[f"{colour} {shape}"]
            if positions is not None:
                positions[i] = class_index[f"{colour} {shape}"] * len(POSITIONS) + position_index(params.cx, params.cy)
    return images, targets


def augment(x: torch.Tensor, generator: torch.Generator, max_noise: float) -> torch.Tensor:
    """Random shifts (<= 2 px), blur, colour jitter and Gaussian noise: ``x`` ``[B,3,H,W]`` in [0,1]."""
    b = x.shape[0]
    shifts = torch.randint(-2, 3, (b, 2), generator=generator)
    x = torch.stack([torch.roll(x[i], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2)) for i in range(b)])
    blur = torch.rand(b, generator=generator) < 0.2
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :]) / 16.0
        weight = k2.expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), weight, groups=3)
        x = x.clone()
        x[blur] = blurred
    jitter = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    gain = 1 + jitter * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.16
    bias = jitter * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    x = x * gain + bias
    noisy = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    sigma = noisy * torch.rand(b, 1, 1, 1, generator=generator) * max_noise
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """CLIP input normalisation of ``x01`` ``[B,3,H,W]`` in [0,1] (OpenAI mean/std, the config default)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def uint8_to_01(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` -> float32 ``[B,3,H,W]`` in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def create_toy_clip(pretrained: str | Path | None = None) -> tuple[torch.nn.Module, Callable]:
    """Build ``toy-clip-vit`` with open_clip (random init, or weights from a local file) and its tokenizer."""
    import open_clip

    open_clip.add_model_config(Path(__file__).resolve().parent / "model_configs")
    model = open_clip.create_model("toy-clip-vit", pretrained=str(pretrained) if pretrained else None)
    return model, open_clip.get_tokenizer("toy-clip-vit")


def encode_text(model: torch.nn.Module, tokenizer: Callable, phrases: list[str], template: str = "a {}") -> torch.Tensor:
    """L2-normalised text features ``[len(phrases), D]`` of ``template.format(phrase)``."""
    return F.normalize(model.encode_text(tokenizer([template.format(p) for p in phrases])), dim=-1)


def encode_image(model: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features ``[B, D]`` of ``x01`` ``[B,3,H,W]`` in [0,1]."""
    return F.normalize(model.encode_image(normalize(x01)), dim=-1)


def train_clip(
    out: str | Path,
    cfg: CLIPTrainConfig | None = None,
    log_fn: Callable[[str], None] = print,
) -> dict:
    """Train the tiny CLIP (from scratch, or from ``cfg.init`` weights) and save fp16 safetensors to
    ``out``; returns the training log."""
    from safetensors.torch import save_file

    cfg = cfg or CLIPTrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"train-clip: steps and batch size must be >= 1 (got {cfg.steps}, {cfg.batch_size})")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, tokenizer = create_toy_clip(cfg.init)
    model.train()
    phrases = all_phrases()
    tokens = {t: tokenizer([t.format(p) for p in phrases]) for t in TEMPLATES}
    pos_phrases = position_phrases()
    pos_tokens = {t: tokenizer([t.format(p) for p in pos_phrases]) for t in TEMPLATES}
    blob_pool = [blob_coverage(rng) for _ in range(cfg.blob_pool_size)]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n_params = sum(p.numel() for p in model.parameters())
    log: dict = {"config": asdict(cfg), "n_params": n_params, "phrases": phrases, "losses": []}
    log_fn(f"toy CLIP: {n_params} parameters; {cfg.steps} steps at batch {cfg.batch_size}, {len(phrases)} captions")
    t_start = time.time()
    running, correct, seen = 0.0, 0, 0
    positions = np.empty(cfg.batch_size, dtype=np.int64)
    for step in range(cfg.steps):
        images, targets = training_batch(rng, cfg.batch_size, cfg, phrases, blob_pool, positions)
        x = augment(uint8_to_01(images), gen, cfg.max_noise)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        img_f = F.normalize(model.encode_image(normalize(x)), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens[template]), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        target = torch.from_numpy(targets)
        loss = F.cross_entropy(logits, target)
        has_pos = torch.from_numpy(positions >= 0)
        if cfg.position_weight > 0 and has_pos.any():
            # position captions make the embedding encode where the shape is, so that a directional
            # edit that moves the shape no longer points along a colour/shape-only text direction
            pos_f = F.normalize(model.encode_text(pos_tokens[template]), dim=-1)
            pos_logits = model.logit_scale.exp() * img_f[has_pos] @ pos_f.T
            loss = loss + cfg.position_weight * F.cross_entropy(pos_logits, torch.from_numpy(positions)[has_pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        correct += int((logits.argmax(-1) == target).sum())
        seen += len(target)
        if (step + 1) % 50 == 0:
            log["losses"].append([step + 1, round(running / 50, 5), round(correct / seen, 4)])
            log_fn(f"step {step + 1}/{cfg.steps} loss {running / 50:.4f} train-acc {correct / seen:.3f} "
                   f"elapsed {time.time() - t_start:.0f}s")
            running, correct, seen = 0.0, 0, 0
    log["wall_time_s"] = round(time.time() - t_start, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"model": "toy-clip-vit", "dtype": "float16"})
    log_fn(f"saved toy CLIP (fp16) to {out} after {log['wall_time_s']:.0f}s")
    return log


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: Callable, n: int = 600, seed: int = 1234) -> float:
    """Held-out zero-shot accuracy over the 12 colour x shape captions ``"a {colour} {shape}"``."""
    ds = sample_dataset(n, seed)
    txt = encode_text(model, tokenizer, class_phrases())
    img = encode_image(model, uint8_to_01(np.stack([s.image for s in ds])))
    pred = (img @ txt.T).argmax(-1).numpy()
    truth = np.asarray([class_phrases().index(f"{s.colour} {s.shape}") for s in ds])
    return float((pred == truth).mean())


def _probs(model: torch.nn.Module, tokenizer: Callable, x01: torch.Tensor, phrases: list[str]) -> torch.Tensor:
    logits = model.logit_scale.exp() * encode_image(model, x01) @ encode_text(model, tokenizer, phrases).T
    return logits.softmax(-1)


@torch.no_grad()
def robustness_probes(model: torch.nn.Module, tokenizer: Callable, n: int = 64, seed: int = 4321) -> dict:
    """Mean probability of ``"a blue circle"`` for images that are not blue circles.

    ``half_red_blue``: circles split half red / half blue through the centre; ``noisy_red``: red
    circles plus Gaussian noise of std 0.1 on [0,1]. Each is measured over the 12 class captions
    (``*_12``) and over all trained captions (``*_all``, hard negatives included).
    """
    rng = np.random.default_rng(seed)
    half = uint8_to_01(np.stack([render_two_colour("red", "blue", "circle", rng, fraction=0.5) for _ in range(n)]))
    red = uint8_to_01(np.stack([s.image for s in sample_dataset(n, seed, colours=["red"], shapes=["circle"])]))
    gen = torch.Generator().manual_seed(seed)
    noisy = (red + 0.1 * torch.randn(red.shape, generator=gen)).clamp(0, 1)
    out = {}
    for name, x in (("half_red_blue", half), ("noisy_red", noisy), ("clean_red", red)):
        for label, phrases in (("12", class_phrases()), ("all", all_phrases())):
            p = _probs(model, tokenizer, x, phrases)[:, phrases.index("blue circle")]
            out[f"p_blue_circle_{name}_{label}"] = round(float(p.mean()), 4)
    return out


def pgd_attack_success(
    model: torch.nn.Module, tokenizer: Callable, eps: float = 4 / 255, steps: int = 10, n: int = 32, seed: int = 99
) -> float:
    """Fraction of red circles that an L-inf PGD attack of radius ``eps`` (on [0,1]) turns into the
    top-1 caption ``"blue circle"`` among the 12 class captions (lower = harder to fool)."""
    phrases = class_phrases()
    target = phrases.index("blue circle")
    x0 = uint8_to_01(np.stack([s.image for s in sample_dataset(n, seed, colours=["red"], shapes=["circle"])]))
    with torch.no_grad():
        txt = encode_text(model, tokenizer, phrases)
    delta = torch.zeros_like(x0, requires_grad=True)
    for _ in range(steps):
        logits = encode_image(model, (x0 + delta).clamp(0, 1)) @ txt.T
        loss = F.cross_entropy(logits * 100, torch.full((n,), target))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= (eps / 4) * grad.sign()
            delta.clamp_(-eps, eps)
    with torch.no_grad():
        pred = (encode_image(model, (x0 + delta).clamp(0, 1)) @ txt.T).argmax(-1)
    return float((pred == target).float().mean())


@torch.no_grad()
def position_accuracy(model: torch.nn.Module, tokenizer: Callable, n: int = 300, seed: int = 77) -> float:
    """Held-out accuracy of the position (3 x 3 grid cell) read from the best of the 108 captions
    ``"{colour} {shape} {position}"`` (chance: 1/9)."""
    ds = sample_dataset(n, seed)
    txt = encode_text(model, tokenizer, position_phrases())
    img = encode_image(model, uint8_to_01(np.stack([s.image for s in ds])))
    pred = (img @ txt.T).argmax(-1).numpy() % len(POSITIONS)
    truth = np.asarray([position_index(s.params.cx, s.params.cy) for s in ds])
    return float((pred == truth).mean())


@torch.no_grad()
def direction_probe(model: torch.nn.Module, tokenizer: Callable, n: int = 50, seed: int = 0) -> dict[str, float]:
    """Mean cosine between the image change and the text direction "red circle" -> "blue circle"
    (templates averaged) for four edits of a red circle: recoloured in place (``inplace``), recoloured
    and moved (``moved``), only moved (``moved_only``) and erased (``erase``). A CLIP that guides edits
    well scores ``inplace`` clearly above ``moved`` and ``erase``."""
    from .render import ShapeParams

    rng = np.random.default_rng(seed)
    bg = np.asarray(BACKGROUND, np.float32)

    def draw(colour: str, cx: float, cy: float) -> np.ndarray:
        cov = coverage("circle", ShapeParams(cx=cx, cy=cy, r=8.0))[..., None]
        return np.rint(cov * np.asarray(COLOURS[colour], np.float32) + (1 - cov) * bg).astype(np.uint8)

    def text_mean(phrase: str) -> torch.Tensor:
        return F.normalize(torch.stack([encode_text(model, tokenizer, [phrase], t)[0] for t in TEMPLATES]).mean(0), dim=-1)

    direction = F.normalize(text_mean("blue circle") - text_mean("red circle"), dim=-1)
    refs, edits = [], {"inplace": [], "moved": [], "moved_only": [], "erase": []}
    for _ in range(n):
        cx, cy, cx2, cy2 = rng.uniform(11, 21, 4)
        refs.append(draw("red", cx, cy))
        edits["inplace"].append(draw("blue", cx, cy))
        edits["moved"].append(draw("blue", cx2, cy2))
        edits["moved_only"].append(draw("red", cx2, cy2))
        edits["erase"].append(np.broadcast_to(np.rint(bg).astype(np.uint8), refs[-1].shape))
    e_ref = encode_image(model, uint8_to_01(np.stack(refs)))
    out = {}
    for name, images in edits.items():
        d = F.normalize(encode_image(model, uint8_to_01(np.stack(images))) - e_ref, dim=-1)
        out[f"cos_{name}"] = round(float((d @ direction).mean()), 4)
    return out


def evaluate_clip(model: torch.nn.Module, tokenizer: Callable, n: int = 600) -> dict:
    """All the model-card numbers: zero-shot and position accuracy, the "blue circle" probes, the
    edit-direction probe, PGD success rates."""
    model.eval()
    metrics = {"zero_shot_acc": zero_shot_accuracy(model, tokenizer, n=n),
               "position_acc": position_accuracy(model, tokenizer)}
    metrics.update(direction_probe(model, tokenizer))
    metrics.update(robustness_probes(model, tokenizer))
    for eps in (2, 4, 8):
        metrics[f"pgd_success_eps{eps}"] = pgd_attack_success(model, tokenizer, eps=eps / 255)
    return metrics
