"""Loading a config: defaults, then a YAML file or preset, then `section.key=value` overrides, then checks.

Unknown keys and bad values fail at load time with the key named and a close match suggested, so a typo never
silently falls back to a default. Presets are package data (`phi2sum/config/presets/*.yaml`), found through
`importlib.resources` in an installed package as in a checkout.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from phi2sum.config.checks import validate
from phi2sum.config.schema import Config
from phi2sum.errors import ConfigError

PRESETS = resources.files("phi2sum.config") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str):
    """A path to a YAML file, or the name of a preset (e.g. `tiny-cpu`, `phi2-xsum-t4`) shipped in the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config file '{name_or_path}' not found; pass a YAML path or a preset name: "
                      f"{', '.join(preset_names())}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(str(path))
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections (model:, data:, ...)")
    for item in overrides:
        _apply_override(data, item)
    return config_from_dict(data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4).

    A text setting takes the value as written (`prompt.template=### Article: {document}` is not cut at ` #` as a
    YAML comment, `Summarize: {document}` does not become a mapping); write it in double quotes for escapes
    like `\\n`. Other values are read as YAML scalars (numbers, true/false, null, lists).
    """
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override '{item}': '{key}' is not a dotted key like train.learning_rate")
    parts = key.split(".")
    if _is_text_setting(parts) and not (len(raw) >= 2 and raw[0] == raw[-1] == '"'):
        return parts, None if raw in ("null", "~") and _is_optional(parts) else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _annotation(parts: list[str]) -> Any:
    """The type annotation of `section.key`, or None for a key the schema does not have (reported later)."""
    node: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def _is_text_setting(parts: list[str]) -> bool:
    kind = _annotation(parts)
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    return [o for o in options if o is not type(None)] == [str]  # text alone (`int | str` is read as YAML)


def _is_optional(parts: list[str]) -> bool:
    kind = _annotation(parts)
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _apply_override(data: dict[str, Any], item: str) -> None:
    parts, value = parse_override(item)
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, data[name] if data[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check a value against its annotation; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):  # lora.target_modules=q_proj,v_proj on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_coerce(v, item_kind, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, str, f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run.name=2024
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {kind}")  # pragma: no cover - a bug in the schema
