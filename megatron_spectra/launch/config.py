"""Loading a launch config: `base:` inheritance, ${ENV} placeholders, validation once.

    config = load_config("configs/780m-deep/spectra-adamw.yaml")
    config["training"]["lr"]; config.run_dir; layout(config).grad_accum
    missing_inputs(config)    # unset ${VARS}, absent data / vocabulary files / Megatron-LM checkout

Every error is a ConfigError that names the offending key (`training.global_batch_size`)
and the file it came from. After `load_config` the data is complete (defaults filled in)
and every later step (command line, sbatch script) is a pure function of it.

An unset ${VAR} without a default is an error, or with `allow_unset=True` (what the `spectra`
commands use) a missing input like an absent file: the placeholder stays in the value, a dry
run shows it and warns, a real launch refuses, naming every missing input at once.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .layout import check_layout
from .schema import ANY, RELATIONS, REQUIRED, SECTIONS, SPECTRA, SUPPORTED, TOP, Key


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; learning rates are written that way.
    A key given twice in one mapping is an error: PyYAML lets the last one silently win."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, then overrides: allowed
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (the earlier value would be silently dropped)", key_node.start_mark)
                seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text, where: str):
    """YAML text (a string or a file) parsed; a syntax error or duplicate key is a ConfigError
    naming `where` and the line."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = " ".join(str(part) for part in (e.context, e.problem) if part)
        raise ConfigError(line, f"invalid YAML: {problem}", where) from None
    except yaml.YAMLError as e:  # e.g. a character YAML does not allow
        raise ConfigError("", f"invalid YAML: {' '.join(str(e).split())}", where) from None


def read_yaml(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f, str(path))
    except FileNotFoundError:
        raise ConfigError("", "no such file", str(path)) from None
    except IsADirectoryError:
        raise ConfigError("", "is a directory, not a YAML file", str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text ({e.reason} {e.object[e.start:e.start + 1]!r}): is it a YAML config?", str(path)) from None
    except OSError as e:
        raise ConfigError("", f"cannot be read: {e.strerror}", str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("", "a config is a mapping of sections", str(path))
    return data


def merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_bases(path: str | Path, _seen: tuple = ()) -> dict:
    """The file's data merged over its `base:` chain (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError("base", f"inheritance cycle through {path}", str(_seen[0]))
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("base", "must be a path or a list of paths", str(path))
    merged: dict = {}
    for b in bases:
        target = (path.parent / b).resolve()
        if not target.is_file():
            raise ConfigError("base", f"no such file {target}", str(path))
        merged = merge(merged, resolve_bases(target, _seen + (path,)))
    return merge(merged, data)


def set_dotted(data: dict, dotted: str, value) -> dict:
    """A copy of data with `a.b.c` set (sweeps and --set override keys this way)."""
    out = copy.deepcopy(data)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{part} is not a section")
    node[last] = value
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def expand_env(value, key: str, env: dict, unset: dict | None = None):
    """${VAR} and ${VAR:-default} inside strings, recursively. An unset VAR without a
    default is an error naming the key, or, given `unset`, left in place and recorded there
    (dotted key -> VAR)."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else k, env, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]", env, unset) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match):
        name, default = match.group(1), match.group(3)
        if name in env and env[name] != "":
            return env[name]
        if match.group(2) is not None:
            return default
        if unset is None:
            raise ConfigError(key, unset_message(name))
        unset[key] = name
        return match.group(0)

    return _ENV.sub(sub, value)


def unset_message(var: str) -> str:
    return f"environment variable {var} is not set"


@dataclass(frozen=True)
class Config:
    """Validated, complete config data plus where it came from."""

    data: dict
    source: str = "<dict>"
    unset: dict = field(default_factory=dict)  # dotted key -> ${VAR} left unexpanded (allow_unset)

    def __getitem__(self, section: str):
        return self.data[section]

    def get(self, dotted: str):
        node = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def run_dir(self) -> Path:
        return Path(self.data["output"]["root"]).absolute() / self.name  # sbatch scripts run from anywhere

    @property
    def checkpoint_dir(self) -> Path:
        root = self.data["output"]["checkpoint_root"]
        return Path(root).absolute() / self.name if root else self.run_dir / "checkpoints"


def load_config(path: str | Path, overrides: dict | None = None, env: dict | None = None,
                allow_unset: bool = False) -> Config:
    data = resolve_bases(path)
    for dotted, value in (overrides or {}).items():
        data = set_dotted(data, dotted, value)
    config = validate(data, env=os.environ if env is None else env, source=str(path), allow_unset=allow_unset)
    if "/" in config.name:
        raise ConfigError("name", f"must be a single folder name (<sweep>/<run> names a sweep's run), got {config.name!r}", str(path))
    return config


def validate(raw: dict, env: dict | None = None, source: str = "<dict>", allow_unset: bool = False) -> Config:
    """Check every key against the schema, fill defaults, expand ${ENV}, check the layout."""
    unset: dict = {}
    try:
        data = _check_sections(expand_env(raw, "", dict(os.environ if env is None else env), unset if allow_unset else None))
        check_layout(data)
        _check_builtin(data)
    except ConfigError as e:
        # A placeholder left in place fails its key's check: the unset variable is the news.
        message = unset_message(unset[e.key]) if e.key in unset else str(e).split(": ", 1)[1]
        if e.key in unset or (source != "<dict>" and not str(e).startswith(source)):
            raise ConfigError(e.key, message, None if source == "<dict>" else source) from None
        raise
    return Config(data, source, unset)


def _check_sections(raw: dict) -> dict:
    data = {}
    for key in raw:
        if key not in TOP and key not in SECTIONS:
            raise ConfigError(key, f"unknown key; top-level keys are {sorted(TOP)}, sections are {sorted(SECTIONS)}")
    data.update(_check_keys({k: v for k, v in raw.items() if k in TOP}, TOP, prefix=""))
    for section, keys in SECTIONS.items():
        value = raw.get(section, {}) or {}
        if not isinstance(value, dict):
            raise ConfigError(section, f"must be a mapping, got {type(value).__name__}")
        data[section] = _check_keys(value, keys, prefix=f"{section}.")
    # Checked for every optimizer, passed on to spectra-* ones only: a sweep over
    # optimizer.name (spectra-adamw against adam) sets them once, in its base.
    data["optimizer"]["spectra"] = _check_keys(data["optimizer"]["spectra"], SPECTRA, prefix="optimizer.spectra.")
    for key, holds, requirement in RELATIONS:
        if not holds(data):
            section, name = key.split(".")
            raise ConfigError(key, f"{requirement}, got {data[section][name]!r}")
    return data


def _check_keys(values: dict, keys: dict, prefix: str) -> dict:
    for key in values:
        if key not in keys:
            close = [k for k in keys if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(keys)}"
            raise ConfigError(prefix + key, f"unknown key{hint}")
    out = {}
    for key, spec in keys.items():
        if key in values:
            out[key] = _check_value(prefix + key, values[key], spec)
        elif spec.default is REQUIRED:
            raise ConfigError(prefix + key, "required")
        else:
            out[key] = copy.deepcopy(spec.default)
    return out


def _check_value(key: str, value, spec: Key):
    allowed = spec.type
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(key, f"expected {names}, got {type(value).__name__} {value!r}")
    if spec.choices and value is not None and value not in spec.choices:
        raise ConfigError(key, f"{value!r} is not one of {list(spec.choices)}")
    if isinstance(value, float) and int in allowed and float not in allowed:
        raise ConfigError(key, f"expected an integer, got {value!r}")
    problem = spec.check(value) if spec.check is not None and value is not None else None
    if problem:
        raise ConfigError(key, f"{problem}, got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "expected a list of strings")
    if isinstance(value, dict) and key != "optimizer.spectra":
        for k, v in value.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}.{k}", f"expected a string or number, got {v!r}")
    return float(value) if float in allowed and isinstance(value, int) else value


def _check_builtin(data: dict) -> None:
    """The builtin trainer has no flag for some keys: refuse values it would not honour."""
    if data["entry"] != "builtin":
        return
    for section, keys in SECTIONS.items():
        for key, spec in keys.items():
            if spec.builtin in (SUPPORTED, ANY):
                continue
            if data[section][key] != spec.builtin:
                raise ConfigError(
                    f"{section}.{key}",
                    f"the builtin trainer does not support {data[section][key]!r} (it always uses {spec.builtin!r}); use entry: megatron-lm",
                )


def missing_inputs(config: Config) -> list[ConfigError]:
    """What the run reads and cannot find, each as an error naming its key: unset ${VARS}
    (with allow_unset), the dataset, vocabulary files, the Megatron-LM checkout. Returned,
    not raised: a dry run warns about all of them, a real launch refuses with all of them."""
    data = config.data
    unused = _unused(data)
    errors = [ConfigError(key, unset_message(var), config.source) for key, var in config.unset.items() if not unused(key)]

    def check(key: str, problem: str) -> None:
        if key not in config.unset and not unused(key):
            errors.append(ConfigError(key, problem, config.source))

    prefix = data["data"]["path"]
    if prefix and not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        check("data.path", f"no {prefix}.bin / {prefix}.idx (a Megatron indexed dataset prefix)")
    for key in ("vocab_file", "merge_file"):
        value = data["data"][key]
        if data["data"]["tokenizer_type"] == "GPT2BPETokenizer" and not value:
            check(f"data.{key}", "required by GPT2BPETokenizer (set it or its ${...} variable)")
        elif value and not Path(value).is_file():
            check(f"data.{key}", f"no such file {value}")
    mlm = data["megatron"]["path"]
    if not mlm:
        check("megatron.path", "not set: point it (or $MEGATRON_LM) at a Megatron-LM checkout")
    elif not (Path(mlm) / "pretrain_gpt.py").is_file():
        check("megatron.path", f"no pretrain_gpt.py in {mlm}")
    return errors


def _unused(data: dict):
    """A predicate on dotted keys: those the run does not read. The builtin trainer takes no
    Megatron-LM checkout and no vocabulary files (schema `builtin=ANY`)."""
    if data["entry"] != "builtin":
        return lambda key: False
    ignored = {f"{s}.{k}" for s, keys in SECTIONS.items() for k, spec in keys.items() if spec.builtin is ANY}
    return lambda key: key.startswith("megatron.") or key in ignored
