"""`dclip-ray toyworld ...` commands (parse options, call the library; no logic)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dclip_ray.errors import ConfigError

from .common import app

toyworld_app = typer.Typer(
    help="The embedded toy world: render data, train the tiny CLIP and DDPM, judge images.",
    no_args_is_help=True,
)
app.add_typer(toyworld_app, name="toyworld")


@toyworld_app.command("make-data")
def make_data_cmd(
    out: Annotated[str, typer.Option("--out", help="output folder or fsspec URL for the WebDataset shards")],
    n: Annotated[int, typer.Option("--n", help="number of images")] = 1200,
    seed: Annotated[int, typer.Option("--seed", help="dataset seed (keys are '{seed}_{index:06d}')")] = 0,
    shard_size: Annotated[int, typer.Option("--shard-size", help="images per shard")] = 1000,
    colours: Annotated[str | None, typer.Option("--colours", help="only these colours, comma-separated "
                                                "(red,green,blue,yellow; default all)")] = None,
    shapes: Annotated[str | None, typer.Option("--shapes", help="only these shapes, comma-separated "
                                               "(circle,square,triangle; default all)")] = None,
    kinds: Annotated[str | None, typer.Option("--kinds", help="exactly these kinds, comma-separated, e.g. "
                                              "'green triangle,blue square' (interleaved across the shards; "
                                              "instead of --colours/--shapes)")] = None,
    captions: Annotated[bool, typer.Option("--captions/--no-captions", help="write the caption (.txt and the "
                                           ".json's caption); --no-captions makes an uncaptioned dataset")] = True,
    style: Annotated[str, typer.Option("--style", help="clean (the trained domain), photo (the shapes on an "
                                       "unseen checkerboard: translate's input) or strokes (rough colour "
                                       "paintings: from-strokes' input)")] = "clean",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the .tar shards already in --out (without "
                                            "it a non-empty --out is refused: edits made from the old images "
                                            "would be paired with new ones)")] = False,
) -> None:
    """Render N toy images (png, caption, json labels, mask) into WebDataset shards in a new or empty folder."""
    from dclip_ray.toyworld.data import write_shards

    def names(v: str | None) -> list[str] | None:
        return None if v is None else [x.strip() for x in v.split(",") if x.strip()]

    if kinds is not None and (colours or shapes):
        raise ConfigError("give --kinds or --colours/--shapes, not both")
    pairs = None
    if kinds is not None:
        pairs = []
        for k in names(kinds) or []:
            parts = k.split()
            if len(parts) != 2:
                raise ConfigError(f"--kinds {k!r}: expected 'COLOUR SHAPE', e.g. 'green triangle'")
            pairs.append((parts[0], parts[1]))
    urls = write_shards(out, n, seed=seed, shard_size=shard_size, colours=names(colours), shapes=names(shapes),
                        kinds=pairs, captions=captions, style=style, overwrite=overwrite)
    typer.echo(f"wrote {n} images in {len(urls)} shard(s) under {out}")


@toyworld_app.command("train-ddpm")
def train_ddpm_cmd(
    out: Annotated[str, typer.Option("--out", help="output folder (diffusers UNet2DModel + scheduler_config.json)")],
    steps: Annotated[int, typer.Option("--steps", help="optimizer steps")] = 2500,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per step (fresh renders)")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="peak Adam learning rate (warmup, then cosine)")] = 6e-4,
    seed: Annotated[int, typer.Option("--seed", help="seed of the renders, timesteps, noise and init")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads")] = 2,
    layers_per_block: Annotated[int, typer.Option("--layers-per-block", help="UNet resnets per level")] = 1,
    save_every: Annotated[int, typer.Option("--save-every", help="write an EMA checkpoint every N steps (0: never)")] = 250,
    init: Annotated[str | None, typer.Option("--init", help="continue from this UNet folder (e.g. the bundled toy_unet)")] = None,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="linear warmup steps")] = 100,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA decay of the saved weights")] = 0.995,
) -> None:
    """Train the toy 32x32 DDPM (eps prediction, linear 1e-4..2e-2 schedule, T=1000); saves the EMA weights."""
    from dclip_ray.toyworld.train_ddpm import DDPMTrainConfig, train_ddpm

    cfg = DDPMTrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
        layers_per_block=layers_per_block, save_every=save_every, init=init,
        warmup_steps=warmup_steps, ema_decay=ema_decay,
    )
    train_ddpm(out, cfg, log_fn=typer.echo)


@toyworld_app.command("train-clip")
def train_clip_cmd(
    out: Annotated[str, typer.Option("--out", help="output .safetensors file (fp16 weights of toy-clip-vit)")],
    steps: Annotated[int, typer.Option("--steps", help="optimizer steps")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per step (fresh renders)")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="peak AdamW learning rate (warmup, then cosine)")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed", help="seed of the renders, augmentations and init")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads")] = 2,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="linear warmup steps")] = 50,
    init: Annotated[str | None, typer.Option("--init", help="start from these weights (.safetensors) instead of random")] = None,
    position_weight: Annotated[float, typer.Option(
        "--position-weight", help="weight of the position-caption loss ('red circle in the top left'); 0 = off")] = 0.0,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="print the model-card metrics after training")] = True,
) -> None:
    """Train the tiny CLIP contrastively on rendered captions with augmentations and hard negatives."""
    from dclip_ray.toyworld.train_clip import CLIPTrainConfig, create_toy_clip, evaluate_clip, train_clip

    cfg = CLIPTrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads, warmup_steps=warmup_steps, init=init,
        position_weight=position_weight,
    )
    train_clip(out, cfg, log_fn=typer.echo)
    if evaluate:
        model, tokenizer = create_toy_clip(out)
        typer.echo(json.dumps(evaluate_clip(model, tokenizer), indent=2))


@toyworld_app.command("judge")
def judge_cmd(
    image: Annotated[str, typer.Argument(help="an image file (any size is read as-is; toy images are 32x32 RGB)")],
    colour: Annotated[str | None, typer.Option("--colour", help="the expected colour (adds 'success')")] = None,
    shape: Annotated[str | None, typer.Option("--shape", help="the expected shape (adds 'success')")] = None,
) -> None:
    """Print what the pixel judge reads from one image: colour, shape and features, as JSON; with
    --colour/--shape also 'success', by the same rule `dclip-ray eval --judge-colour/--judge-shape` uses."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from dclip_ray.errors import InputFileError
    from dclip_ray.toyworld import judge

    try:
        arr = np.asarray(Image.open(image).convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise InputFileError(f"{image}: cannot read the image ({e.__class__.__name__}); pass a PNG or JPEG file") from e
    r = judge(arr)
    typer.echo(json.dumps({
        "colour": r.colour, "shape": r.shape, "colour_purity": round(r.colour_purity, 4),
        "colour_distance": round(r.colour_distance, 2), "fill_ratio": round(r.fill_ratio, 4),
        "v_offset": round(r.v_offset, 4), "fg_pixels": r.fg_pixels, "bg_error": round(r.bg_error, 5),
        **({"success": r.success(colour, shape)} if colour or shape else {}),
    }))
