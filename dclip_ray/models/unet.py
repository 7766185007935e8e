"""Loading UNets from local files or fsspec URLs: diffusers folders, ddim-format ``.ckpt`` and
ADM ``.pt`` checkpoints (converted on load), plus the engine's ``eps_fn`` and saved schedules."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dclip_ray.adapters import apply_adapter, is_adapter
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models.trust import is_trusted
from dclip_ray.urls import is_remote, local_path

from .convert import convert_state_dict, detect_format
from .presets import Preset, get_preset, is_preset, list_presets

if TYPE_CHECKING:
    from diffusers import UNet2DModel


@contextmanager
def local_copy(src: str) -> Iterator[str]:
    """Yield a local path for ``src`` (a local path, or any fsspec URL copied to a temp dir)."""
    src = local_path(src)
    if not is_remote(src):
        if not os.path.exists(src):
            raise InputFileError(f"{src}: no such file or folder; give a diffusers folder, a .ckpt/.pt/.safetensors file or a URL")
        yield src
        return
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(src)
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except Exception as e:  # unknown protocol, missing driver, network or auth failure
        raise InputFileError(f"cannot read {src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None
    if not exists:
        raise InputFileError(f"cannot read {src}: not found; check the URL")
    tmp = tempfile.mkdtemp(prefix="dclip-ray-")
    try:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")) or "model")
        try:
            fs.get(path, local, recursive=is_dir)
        except Exception as e:
            raise InputFileError(f"cannot read {src}: {type(e).__name__}: {e}") from None
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwrap(obj: object) -> dict | None:
    """Find the tensor state dict inside a checkpoint object (plain dict, training-state dict,
    or the ddim repo's list [model, optimizer, epoch, step, ema])."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("ema", "state_dict", "model_state_dict", "model", "net"):
            if key in obj:
                found = _unwrap(obj[key])
                if found:
                    return found
        return None
    if isinstance(obj, (list, tuple)):
        candidates = [c for c in obj if isinstance(c, Mapping)]
        if len(obj) >= 5 and isinstance(obj[-1], Mapping):  # ddim repo: EMA weights last
            candidates.insert(0, obj[-1])
        for c in candidates:
            found = _unwrap(c)
            if found and detect_format(_strip_module(found)):
                return found
    return None


def _strip_module(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def read_state_dict(path: str, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file (.safetensors, or a torch pickle loaded with
    ``weights_only=True``; arbitrary pickles only with ``trust_checkpoint``). 'module.' prefixes
    (DataParallel) are removed."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return _strip_module(load_file(path))
        except Exception as e:
            raise InputFileError(f"{path}: not a readable safetensors file ({type(e).__name__}); re-download it") from None
    not_ckpt = f"{path}: not a PyTorch checkpoint (cannot unpickle); expected a .ckpt/.pt/.safetensors UNet checkpoint"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # garbage, not a pickle that needs Python classes
            raise InputFileError(not_ckpt) from None
        if not is_trusted(trust_checkpoint):
            raise InputFileError(
                f"{path}: the checkpoint holds Python objects beyond tensors; re-run with --trust-checkpoint only if you trust its source"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise InputFileError(f"{path}: cannot unpickle the checkpoint ({type(e2).__name__}: {str(e2)[:120]})") from None
    except Exception:  # truncated zip, text file, wrong magic ...: torch raises many types
        raise InputFileError(not_ckpt) from None
    sd = _unwrap(obj)
    if sd is None:
        raise InputFileError(f"{path}: no UNet state dict found in the checkpoint; expected a ddim .ckpt, an ADM .pt or a diffusers state dict")
    return _strip_module(sd)


def _diffusers_dir(path: str) -> tuple[str, str | None] | None:
    """(folder, subfolder) when ``path`` is a diffusers UNet folder or a pipeline with ``unet/``."""
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p), None
    if (p / "unet" / "config.json").is_file():
        return str(p), "unet"
    return None


def _load_diffusers_folder(path: str, src: str) -> UNet2DModel:
    from diffusers import UNet2DModel

    found = _diffusers_dir(path)
    if found is None:
        raise InputFileError(f"{src}: folder has no config.json (nor unet/config.json); expected a diffusers UNet2DModel folder")
    folder, sub = found
    cfg_path = Path(folder, sub or "", "config.json")
    try:
        cls_name = json.loads(cfg_path.read_text()).get("_class_name", "UNet2DModel")
    except (OSError, ValueError):
        raise InputFileError(f"{src}: unreadable config.json; expected a diffusers UNet2DModel config") from None
    if cls_name != "UNet2DModel":
        raise InputFileError(f"{src}: config.json describes a {cls_name}; expected a UNet2DModel (pixel-space DDPM)")
    try:
        # low_cpu_mem_usage=False: what diffusers falls back to without accelerate anyway, minus its warning
        return UNet2DModel.from_pretrained(folder, subfolder=sub, low_cpu_mem_usage=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputFileError(f"{src}: cannot load the diffusers UNet ({msg})") from None


def build_unet(state_dict: Mapping[str, torch.Tensor], fmt: str, config: Mapping, src: str, preset_name: str) -> UNet2DModel:
    """Convert ``state_dict`` (format ``fmt``) and load it strictly into ``UNet2DModel(config)``.

    Raises InputFileError naming the missing / unexpected / mis-shaped keys when the checkpoint
    does not fit the preset's architecture.
    """
    from diffusers import UNet2DModel

    try:
        converted = convert_state_dict(state_dict, fmt, config)
    except KeyError as e:
        raise InputFileError(f"{src}: key {e.args[0]!r} does not fit preset {preset_name} ({fmt} format); pick the preset matching the checkpoint") from None
    model = UNet2DModel.from_config(dict(config))
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    shapes = [k for k in converted if k in expected and converted[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise InputFileError(f"{src}: checkpoint does not fit preset {preset_name}: {', '.join(parts)}; pick the preset matching the checkpoint")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model


def _resolve_preset_src(src: str) -> tuple[str, Preset]:
    p = get_preset(src)
    if p.kind != "unet":
        raise ConfigError(f"preset {src} is a {p.kind} preset; give a UNet preset ({', '.join(list_presets('unet'))})")
    path = p.weights_path()
    if path is None:
        raise ConfigError(f"preset {src} has no bundled weights: pass the checkpoint file ({p.source.text}) with --preset {src}")
    if not os.path.exists(path):
        raise InputFileError(f"preset {src}: its weights {path} are not there yet; build them (see {p.source.text})")
    return path, p


def _load_adapter_folder(local: str, src: str, trust_checkpoint: bool, base_unet: torch.nn.Module | None) -> UNet2DModel:
    """A LoRA folder (``finetune --adapter lora``): ``base_unet`` (else the base its card names) with the
    adapter merged in."""
    if base_unet is None:
        try:
            base_src = json.loads((Path(local) / "dclip.json").read_text())["base_model"]
        except (OSError, ValueError, KeyError):
            raise InputFileError(f"{src}: an adapter folder without a dclip.json naming its base model; re-run "
                                 "finetune --adapter lora") from None
        if not (os.path.exists(base_src) or is_preset(base_src) or is_remote(base_src)):
            raise InputFileError(f"{src}: its base model {base_src} (as named when it was trained) is not there "
                                 "from here; pass the base model (--model/--base)")
        base_unet = load_unet(base_src, trust_checkpoint=trust_checkpoint)
    return apply_adapter(base_unet, local)


def load_unet(src: str, preset: str | None = None, trust_checkpoint: bool = False,
              base_unet: torch.nn.Module | None = None) -> UNet2DModel:
    """Load a pixel-space diffusion UNet as a diffusers ``UNet2DModel`` in eval mode.

    ``src``: a diffusers folder (local path or fsspec URL; a pipeline snapshot with a ``unet/``
    subfolder works too), a ddim-format ``.ckpt`` (Ho et al. DDPM, converted on load), an ADM
    ``.pt`` (guided-diffusion, converted on load), a ``.safetensors`` state dict, or the name of a
    preset with bundled weights (e.g. ``toy_shapes``). The format is detected from the keys;
    ``preset`` (a name or a preset ``.yaml`` path) gives the architecture for raw checkpoints.
    Pickles that need more than tensors load only with ``trust_checkpoint=True``. A LoRA adapter folder
    loads onto ``base_unet`` (else the base its card names), merged; check its base first
    (:func:`dclip_ray.models.base.check_base_model`).
    Raises InputFileError / ConfigError with a one-line message on bad input.
    """
    p = get_preset(preset) if preset else None
    if is_preset(src) and not os.path.exists(src):
        src, own = _resolve_preset_src(src)
        p = p or own
    with local_copy(src) as local:
        if os.path.isdir(local) and is_adapter(local):
            model = _load_adapter_folder(local, src, trust_checkpoint, base_unet)
        elif os.path.isdir(local):
            model = _load_diffusers_folder(local, src)
        else:
            sd = read_state_dict(local, trust_checkpoint)
            fmt = detect_format(sd)
            if fmt is None:
                raise InputFileError(
                    f"{src}: unrecognised checkpoint keys (e.g. {next(iter(sd), '<none>')}); expected a ddim-format, ADM or diffusers UNet state dict"
                )
            if p is None:
                raise ConfigError(
                    f"{src} is a {fmt}-format checkpoint: name its architecture with --preset ({', '.join(list_presets('unet'))} or a preset .yaml)"
                )
            if p.kind != "unet":
                raise ConfigError(f"preset {p.name} is a {p.kind} preset; give a UNet preset")
            config = p.unet_config()
            if config is None:
                raise ConfigError(f"preset {p.name} describes a diffusers folder, but {src} is a raw {fmt} checkpoint; use its matching preset")
            if fmt != "diffusers" and p.format != fmt:
                raise InputFileError(f"{src} is a {fmt}-format checkpoint but preset {p.name} expects {p.format}; pick the matching preset")
            model = build_unet(sd, fmt, config, src, p.name)
    return model.eval()


def eps_fn_of(unet: UNet2DModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The engine's ``eps_fn(x_t: [B,C,H,W], t: LongTensor [B]) -> eps [B,C,H,W]`` for a
    ``UNet2DModel``: learned-sigma models (2C output channels) give their first C channels."""
    channels = int(unet.config.in_channels)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t).sample[:, :channels]

    return eps_fn


def _read_json(path: str) -> dict | None:
    try:
        if is_remote(path):
            import fsspec

            with fsspec.open(path, "r") as f:
                return json.load(f)
        if os.path.isfile(path):
            return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputFileError(f"{path}: unreadable scheduler config ({type(e).__name__}); expected diffusers JSON") from None
    return None


def load_schedule_config(src: str, preset: str | None = None) -> dict | None:
    """The diffusers scheduler config saved beside a model, for ``schedule_from_config``.

    Looks for ``scheduler_config.json`` in the folder ``src``, in ``src/scheduler/``, and in the
    parent's ``scheduler/`` (``src`` being a pipeline's ``unet/``); else the schedule of ``preset``
    (or of ``src`` when it is a preset name); else None.
    """
    if is_preset(src) and not os.path.exists(src):
        p = get_preset(src)
        own = p.weights_path()
        if own and os.path.isdir(own):  # bundled diffusers folder: its own saved schedule first
            cfg = _read_json(os.path.join(own, "scheduler_config.json"))
            if cfg is not None:
                return cfg
        return p.schedule.to_scheduler_config() if p.schedule else None
    base = local_path(src.rstrip("/"))
    parent = base.rsplit("/", 1)[0] if "/" in base else "."
    for cand in (f"{base}/scheduler_config.json", f"{base}/scheduler/scheduler_config.json", f"{parent}/scheduler/scheduler_config.json"):
        cfg = _read_json(cand)
        if cfg is not None:
            return cfg
    if preset:
        p = get_preset(preset)
        return p.schedule.to_scheduler_config() if p.schedule else None
    return None


def convert_checkpoint(src: str, preset: str | None, out_dir: str, trust_checkpoint: bool = False) -> str:
    """Convert a checkpoint (ddim / ADM / diffusers) to a diffusers folder at ``out_dir``:
    ``config.json`` + ``diffusion_pytorch_model.safetensors`` + ``scheduler_config.json``.

    Written to a temporary sibling folder and renamed into place (no half-written output).
    Returns ``out_dir``. Raises ConfigError when ``out_dir`` exists and is not empty.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out_dir} already exists and is not empty; choose a new folder or remove it")
    model = load_unet(src, preset, trust_checkpoint)
    sched = load_schedule_config(src, preset)
    if sched is None:
        sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                 "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
