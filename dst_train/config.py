"""Typed run configuration: dataclasses loaded from YAML, overridden by ``key=value`` pairs.

Every option of a run is a field below with its documentation in the field's comment; this file
is the one place they are listed (docs/configuration.md is generated from the same text).
Unknown keys are errors, values are checked against the field types, and the resolved config is
written into the run directory so a checkpoint carries the options that made it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    root: str = ""  # dataset root: prepared/{train,val,test}.jsonl, frames/, dst/
    span_policy: str = "repair"  # DST children outside parent span: error | repair | clip
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/default"  # run directory: checkpoints/, hf/, metrics.jsonl, plots
    seed: int = 0

    def validate(self) -> list[str]:
        """Every problem at once (litgpt style), empty when the config is usable."""
        problems = []
        if self.data.span_policy not in ("error", "repair", "clip"):
            problems.append(
                f"data.span_policy must be error|repair|clip, got {self.data.span_policy!r}"
            )
        return problems


# --------------------------------------------------------------- loading
def load_config(
    path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig
) -> Any:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    cfg = _build(cls, raw, where=str(path or "config"))
    problems = cfg.validate() if hasattr(cfg, "validate") else []
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: dict, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
