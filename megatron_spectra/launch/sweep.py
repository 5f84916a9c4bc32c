"""Sweeps: a base config plus a grid (and zipped lists) over any keys, expanded to named runs.

    base: ../160m/spectra-adamw.yaml        # relative to this file
    name: 160m-lr-threshold                 # runs live in <output.root>/<name>/<run>
    set: {training.train_iters: 24414}      # applied to every run
    grid:                                   # every combination...
      training.lr: [5.0e-4, 1.0e-3, 2.0e-3]
      optimizer.spectra.clip_threshold: [5.0, 10.0]
    zip:                                    # ...times each row of lists varied together
      - {optimizer.name: [spectra-adamw, spectra-signum], training.lr_warmup_iters: [2000, 8000]}

A run is named by its varied values, `lr=0.001_clip_threshold=10`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from .config import Config, read_yaml, resolve_bases, set_dotted, validate
from .errors import ConfigError
from .schema import run_name as bad_run_name

SWEEP_KEYS = ("base", "name", "description", "set", "grid", "zip")


@dataclass(frozen=True)
class Run:
    name: str  # within the sweep
    overrides: dict  # dotted key -> value, the varied ones
    config: Config


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    runs: list

    @property
    def dir(self) -> Path:
        return self.runs[0].config.run_dir.parent


def load_sweep(path: str | Path, overrides: dict | None = None, env: dict | None = None, allow_unset: bool = False) -> Sweep:
    """overrides: dotted keys set on every run after the sweep's own `set` (the CLI's --set);
    allow_unset: as for load_config."""
    return expand_sweep(read_yaml(path), path, overrides, env, allow_unset)


def expand_sweep(spec: dict, path: str | Path, overrides: dict | None = None, env: dict | None = None,
                 allow_unset: bool = False) -> Sweep:
    """A sweep from its data (a sweep file's, or one a command built); `base` is relative to path."""
    path = Path(path)
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(key, f"unknown sweep key; known: {', '.join(SWEEP_KEYS)}", str(path))
    for key in ("base", "name"):
        if not isinstance(spec.get(key), str):
            raise ConfigError(key, "required (a string)", str(path))
    if "/" in spec["name"] or bad_run_name(spec["name"]):
        raise ConfigError("name", f"must be a single plain folder name (letters, digits and . _ = + -, not starting "
                                  f"with . or -): the sweep's folder is output.root/name, got {spec['name']!r}", str(path))
    base = path.parent / spec["base"]
    if not base.is_file():
        raise ConfigError("base", f"no such file {base.resolve()}", str(path))
    data = resolve_bases(base)
    for dotted, value in {**_mapping(spec, "set", path), **(overrides or {})}.items():
        data = set_dotted(data, dotted, value)
    runs = []
    for varied in expand(spec, path):
        run_name = run_name_of(varied)
        run_data = data
        for dotted, value in varied.items():
            run_data = set_dotted(run_data, dotted, value)
        run_data = set_dotted(run_data, "name", f"{spec['name']}/{run_name}")
        try:
            config = validate(run_data, env=env, source=str(path), allow_unset=allow_unset)
        except ConfigError as e:
            raise ConfigError(e.key, f"run {run_name}: {str(e).split(': ', 2)[-1]}", str(path)) from None
        runs.append(Run(run_name, varied, config))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("grid", "two runs get the same name (repeated values?)", str(path))
    return Sweep(spec["name"], str(path), runs)


def _mapping(spec: dict, key: str, path: Path) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping of dotted keys", str(path))
    return value


def expand(spec: dict, path: Path | str = "<sweep>") -> list[dict]:
    """The grid's product times the zip groups' rows (each group's lists vary together)."""
    grid = _mapping(spec, "grid", Path(path))
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", "must be a non-empty list of values", str(path))
        axes.append([{key: v} for v in values])
    groups = spec.get("zip") or []
    groups = [groups] if isinstance(groups, dict) else groups
    if not isinstance(groups, list):
        raise ConfigError("zip", "must be a mapping or a list of mappings", str(path))
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not group:
            raise ConfigError(f"zip[{i}]", "must be a non-empty mapping of dotted key -> list", str(path))
        lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
        if min(lengths.values()) < 1 or len(set(lengths.values())) != 1:
            raise ConfigError(f"zip[{i}]", f"needs non-empty lists of one length, got lengths {lengths}", str(path))
        n = next(iter(lengths.values()))
        axes.append([{k: v[j] for k, v in group.items()} for j in range(n)])
    keys = [k for axis in axes for k in axis[0]]
    if len(set(keys)) != len(keys):
        raise ConfigError("grid", f"a key is varied twice: {keys}", str(path))
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def run_name_of(overrides: dict) -> str:
    if not overrides:
        return "base"
    lasts = [_label(k) for k in overrides]
    parts = []
    for key, last in zip(overrides, lasts):
        label = last if lasts.count(last) == 1 else key
        parts.append(f"{label}={_value_label(overrides[key])}")
    return re.sub(r"[^A-Za-z0-9.=+_-]", "-", "_".join(parts))


def _label(dotted: str) -> str:
    """The last part of a dotted key, or for `section.name` the section (optimizer=adam)."""
    parts = dotted.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _value_label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
