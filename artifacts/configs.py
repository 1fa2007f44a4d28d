"""Config parsing: ``--set stage.field=value`` overrides and configs rebuilt from dicts (flows, deployments, torchrun
workers), each refusing unknown keys and wrong values with a one-line ConfigError.

Here, below the stages and the app, so that a stage's worker and the flows parse configs without importing the
``golf`` command; the presets are the app's (``golf.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A preset, key or value the user gave that does not fit the config."""


# --- overrides -------------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(text: str, kind: Any, key: str) -> Any:
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text.replace("_", ""))
        if kind is str:
            return text
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a valid {kind.__name__}") from None
    raise ConfigError(f"{key}: cannot set a field of type {kind}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_override(cls: type, path: list[str], text: str, full_key: str, changes: dict) -> None:
    """Check one ``--set`` against the config classes and put its parsed value into ``changes``, nested by group."""
    fields = _fields(cls)
    name = path[0]
    if name not in fields:
        hint = difflib.get_close_matches(name, fields, n=1)
        raise ConfigError(f"unknown config key {full_key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; {cls.__name__} has: {', '.join(fields)}")
    kind = fields[name]
    if dataclasses.is_dataclass(kind):
        if len(path) == 1:
            raise ConfigError(f"{full_key} is a group of settings; set one of its fields, e.g. {full_key}.{next(iter(_fields(kind)))}=...")
        _parse_override(kind, path[1:], text, full_key, changes.setdefault(name, {}))
    else:
        if len(path) > 1:
            raise ConfigError(f"{'.'.join(full_key.split('.')[:-len(path) + 1])} is not a group of settings")
        changes[name] = _Set(parse_value(text, kind, full_key), f"{full_key}={text}")


@dataclass(frozen=True)
class _Set:
    value: Any
    item: str  # 'stage.field=value' as given, for messages


def _apply(cfg: Any, changes: dict) -> tuple[Any, list[str]]:
    """``cfg`` with ``changes`` applied, each config built once with all of its changes (so its own validation,
    __post_init__, sees them together and the order of the --set options does not matter); and the items."""
    kwargs, items = {}, []
    for name, change in changes.items():
        if isinstance(change, _Set):
            kwargs[name] = change.value
            items.append(change.item)
        else:
            kwargs[name], sub_items = _apply(getattr(cfg, name), change)
            items += sub_items
    try:
        return dataclasses.replace(cfg, **kwargs), items
    except ValueError as e:  # a config's own validation (__post_init__)
        raise ConfigError(f"{', '.join(items)}: {e}") from None


def set_field(cfg: Any, path: list[str], text: str, full_key: str) -> Any:
    """``cfg`` with one field set from text (``path``: the field's names from ``cfg`` down)."""
    changes: dict = {}
    _parse_override(type(cfg), path, text, full_key, changes)
    return _apply(cfg, changes)[0]


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``stage.field=value`` strings (nested: ``train.model.num_layers=6``); the last of one key wins.

    Every config is validated with all of its overrides at once: ``--set train.max_seconds=0 --set
    train.max_steps=100`` is fine in either order."""
    changes: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects stage.field=value, got {item!r}")
        _parse_override(type(cfg), key.strip().split("."), text.strip(), key.strip(), changes)
    return _apply(cfg, changes)[0] if changes else cfg


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Rebuild a (nested) config dataclass from a dict (a flow's or deployment's parameters), refusing unknown
    keys, values of the wrong type and values the config's own validation refuses: a ConfigError naming the
    field. ``where`` names the config in messages, as a --set key would ('train', 'train.model'; default: the
    class name, none for a class marked CONFIG_ROOT, the whole pipeline's)."""
    prefix = f"{where}." if where else "" if getattr(cls, "CONFIG_ROOT", False) else f"{cls.__name__}."
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of its fields, got {type(data).__name__} {data!r}")
    fields = _fields(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        kind, key = fields[name], prefix + name
        if dataclasses.is_dataclass(kind):
            kwargs[name] = config_from_dict(kind, value, key)
            continue
        if kind is float and type(value) is int:
            value = float(value)
        if kind in (int, float, str, bool) and type(value) is not kind:
            raise ConfigError(f"{key}: {value!r} is not a valid {kind.__name__}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # the config's own validation (__post_init__)
        raise ConfigError(f"{where}: {e}") from None


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out
