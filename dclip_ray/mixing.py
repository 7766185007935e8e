"""Model combinations as closures over eps functions: edit strength and gamma(t) mixing (eq. 14).

The samplers in :mod:`dclip_ray.diffusion` never grow flags for these: a combination is just another
``eps_fn(x_t, t)``. Because ``x0_pred`` is linear in eps, mixing eps also mixes ``x0_pred`` exactly as
eq. 14 asks.

Gamma schedules are data (a dict, e.g. from a YAML mix spec):

- ``{"type": "constant", "weights": [0.3, 0.7]}``
- ``{"type": "piecewise", "table": {300: [1, 0], 0: [0.3, 0.7]}}``: the official "hybrid" table; at step
  t the largest threshold with ``t >= threshold`` applies;
- ``{"type": "ramp", "start": {"t": 500, "weights": [1, 0]}, "end": {"t": 0, "weights": [0, 1]}}``:
  linear in t between the two points, constant outside.

Weights at every step must be finite and sum to 1 (eq. 14); a schedule that does not is an error naming
the weight or the step. Negative weights are allowed (a task vector: they subtract that model's edit)
but a mix holding one gives a :class:`~dclip_ray.errors.DclipWarning`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dclip_ray.diffusion import EpsFn
from dclip_ray.errors import ConfigError, DclipWarning
from dclip_ray.urls import is_url

SUM_TOLERANCE = 1e-6


class GammaSchedule(Protocol):
    """Weights over M models as a function of the integer step t."""

    def weights(self, t: int) -> list[float]:
        """The M weights at step ``t`` (should sum to 1)."""
        ...


@dataclass(frozen=True)
class ConstantGamma:
    """The same weights at every step."""

    values: tuple[float, ...]

    def weights(self, t: int) -> list[float]:
        """The M weights at step ``t``."""
        return list(self.values)


@dataclass(frozen=True)
class PiecewiseGamma:
    """Official "hybrid" table: thresholds -> weights; at step t the largest threshold <= t applies."""

    table: tuple[tuple[int, tuple[float, ...]], ...]  # sorted by threshold, descending

    def weights(self, t: int) -> list[float]:
        """The M weights at step ``t``; a step below every threshold is an error naming it."""
        for threshold, values in self.table:
            if t >= threshold:
                return list(values)
        raise ConfigError(
            f"gamma table has no entry for step t={t}: its lowest threshold is {self.table[-1][0]}; add a row for 0"
        )


@dataclass(frozen=True)
class RampGamma:
    """Linear interpolation in t from ``start_weights`` at ``start_t`` to ``end_weights`` at ``end_t``."""

    start_t: int
    start_weights: tuple[float, ...]
    end_t: int
    end_weights: tuple[float, ...]

    def weights(self, t: int) -> list[float]:
        """The M weights at step ``t`` (clamped to the end points outside the ramp)."""
        if self.start_t == self.end_t:
            return list(self.end_weights)
        u = (t - self.start_t) / (self.end_t - self.start_t)
        u = min(max(u, 0.0), 1.0)
        return [(1 - u) * a + u * b for a, b in zip(self.start_weights, self.end_weights, strict=True)]


def _floats(values: Any, where: str) -> tuple[float, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of weights, got {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: weights must be numbers, got {values!r}") from None
    for i, v in enumerate(out):
        if not math.isfinite(v):  # NaN passes the sum-to-1 check (every comparison is False) and blanks every output
            raise ConfigError(f"{where}[{i}] = {v}: every gamma weight must be a finite number; fix that weight")
    return out


def gamma_from_spec(spec: Mapping[str, Any]) -> GammaSchedule:
    """Parse a gamma schedule from data (see the module docstring for the three forms)."""
    kind = spec.get("type")
    if kind == "constant":
        return ConstantGamma(_floats(spec.get("weights"), "gamma.weights"))
    if kind == "piecewise":
        table = spec.get("table")
        if not isinstance(table, Mapping) or not table:
            raise ConfigError("gamma.table: expected a mapping {step_threshold: [weights, ...]}")
        rows = []
        for k, v in table.items():
            try:
                threshold = int(k)
            except (TypeError, ValueError):
                raise ConfigError(f"gamma.table: thresholds must be integer steps, got {list(table)}") from None
            rows.append((threshold, _floats(v, f"gamma.table[{k}]")))  # its own error names the row
        return PiecewiseGamma(tuple(sorted(rows, reverse=True)))
    if kind == "ramp":
        start, end = spec.get("start"), spec.get("end")
        if not isinstance(start, Mapping) or not isinstance(end, Mapping) or "t" not in start or "t" not in end:
            raise ConfigError("gamma ramp needs start: {t, weights} and end: {t, weights}")
        return RampGamma(int(start["t"]), _floats(start.get("weights"), "gamma.start.weights"),
                         int(end["t"]), _floats(end.get("weights"), "gamma.end.weights"))
    raise ConfigError(f"gamma.type={kind!r}: expected one of 'constant', 'piecewise', 'ramp'")


def validate_gamma(gamma: GammaSchedule, n_models: int, steps: Iterable[int]) -> None:
    """Check that at every step in ``steps`` there are ``n_models`` finite weights summing to 1.

    Raises :class:`ConfigError` naming the first offending step.
    """
    for t in steps:
        w = gamma.weights(t)
        if len(w) != n_models:
            raise ConfigError(f"gamma at step t={t} has {len(w)} weights for {n_models} models; give one per model")
        if not all(math.isfinite(v) for v in w):
            raise ConfigError(f"gamma weights at step t={t} are {w}: every weight must be a finite number; fix them")
        total = sum(w)
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ConfigError(f"gamma weights at step t={t} sum to {total:.6g}, not 1 (eq. 14); rescale them")


def mixed_eps_fn(eps_fns: Sequence[EpsFn], gamma: GammaSchedule, num_timesteps: int = 1000) -> EpsFn:
    """Eq. 14: ``eps(x_t, t) = sum_i gamma_i(t) * eps_i(x_t, t)`` over M models.

    The schedule is validated for every step in ``[0, num_timesteps)`` before any network runs. A model
    whose weight is 0 at step t is not evaluated.
    """
    if not eps_fns:
        raise ConfigError("mixing needs at least one model")
    validate_gamma(gamma, len(eps_fns), range(num_timesteps - 1, -1, -1))  # in generation order

    def _at(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        out: torch.Tensor | None = None
        for fn, w in zip(eps_fns, gamma.weights(step), strict=True):
            if w == 0.0:
                continue
            term = fn(x, t) if w == 1.0 else w * fn(x, t)
            out = term if out is None else out + term
        assert out is not None  # weights sum to 1, so at least one is non-zero
        return out

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        steps = torch.unique(t)
        if steps.numel() == 1:
            return _at(x_t, t, int(steps.item()))
        out = torch.empty_like(x_t)
        for step in steps.tolist():
            idx = (t == step).nonzero(as_tuple=True)[0]
            out[idx] = _at(x_t[idx], t[idx], int(step))
        return out

    return eps_fn


def strength_eps_fn(original: EpsFn, finetuned: EpsFn, r: float) -> EpsFn:
    """Edit strength: ``eps = r * eps_finetuned + (1 - r) * eps_original``, ``r`` in [0, 1].

    ``r = 1`` evaluates only the fine-tuned model, ``r = 0`` only the original.
    """
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"strength r={r} must be in [0, 1] (1 = the fine-tuned model alone)")
    return mixed_eps_fn([original, finetuned], ConstantGamma((1.0 - r, r)), num_timesteps=1)


@dataclass(frozen=True)
class MixSpec:
    """A multi-attribute mix (eq. 14): fine-tuned model folders and the gamma schedule over them."""

    models: tuple[str, ...]
    gamma: dict[str, Any]

    def schedule(self) -> GammaSchedule:
        """The parsed gamma schedule (validated against ``len(models)`` by :func:`mixed_eps_fn`)."""
        return gamma_from_spec(self.gamma)

    def as_dict(self) -> dict[str, Any]:
        """Plain data ``{"models": [...], "gamma": {...}}`` (what a mix YAML file holds)."""
        return {"models": list(self.models), "gamma": dict(self.gamma)}


def mix_from_data(data: Any, where: str = "mix", base_dir: str | None = None) -> MixSpec:
    """Validate mix data ``{"models": [folder, ...], "gamma": {type: ...}}`` into a :class:`MixSpec`.

    Relative local model paths resolve against ``base_dir`` (the mix file's folder) when they do not
    exist as given. The gamma schedule must give one finite weight per model, summing to 1 at every step
    (checked for t = 0..999); errors name ``where`` and the field. A negative weight is allowed but
    warned about (:func:`warn_negative_weights`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'models' and 'gamma'")
    unknown = sorted(set(data) - {"models", "gamma"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; a mix has only 'models' and 'gamma'")
    models = data.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: 'models' must be a non-empty list of fine-tuned model folders")
    gamma = data.get("gamma")
    if not isinstance(gamma, Mapping):
        raise ConfigError(f"{where}: 'gamma' must be a gamma spec (type: constant | piecewise | ramp)")
    if base_dir is not None:
        models = [m if is_url(m) or os.path.isabs(m) or os.path.exists(m) else os.path.normpath(os.path.join(base_dir, m))
                  for m in models]
    try:
        schedule = gamma_from_spec(gamma)
        validate_gamma(schedule, len(models), range(999, -1, -1))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    warn_negative_weights(schedule, where)
    return MixSpec(tuple(models), dict(gamma))


def warn_negative_weights(gamma: GammaSchedule, where: str, steps: Iterable[int] = range(1000)) -> float | None:
    """Give a :class:`DclipWarning` when ``gamma`` has a negative weight at one of ``steps``; return the
    most negative weight (None when there is none). Negative weights stay allowed: they are task vectors."""
    lowest = min((w for t in steps for w in gamma.weights(t)), default=0.0)
    if lowest >= 0:
        return None
    warnings.warn(f"{where}: negative gamma weight {lowest:g}: that model's edit is subtracted (a task vector); "
                  "check that this is intended", DclipWarning, stacklevel=2)
    return lowest


def load_mix_spec(path: str) -> MixSpec:
    """Read a mix YAML file (``models:`` list + ``gamma:`` spec, see the module docstring).

    Raises :class:`InputFileError` for a missing/unreadable file and :class:`ConfigError` for bad content.
    """
    import yaml

    from dclip_ray.errors import InputFileError
    from dclip_ray.yamlfile import load_yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f, f"mix file {path}")
    except FileNotFoundError:
        raise InputFileError(f"mix file {path} not found; pass a YAML file with 'models' and 'gamma'") from None
    except (OSError, yaml.YAMLError) as e:
        raise InputFileError(f"mix file {path} is not readable YAML ({type(e).__name__}); fix its syntax") from None
    return mix_from_data(data, f"mix file {path}", os.path.dirname(os.path.abspath(path)))
