"""Turning pydantic validation into actstore's one-line `ConfigError`s, with did-you-mean for unknown keys.

Every config (extraction, jobs, SAE/training/probe settings) is a pydantic model or dataclass. Users build them
from YAML, `--set key=value`, CLI flags or Python keywords; whichever way, a mistake must come back as one line
that names the field (dotted for nested configs) and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from actstore.schemas.errors import ConfigError

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20  # config files are tiny; a huge one is a mistake or an attack


def field_names(cls: Any) -> list[str]:
    """The fields of a pydantic model or (pydantic) dataclass."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


def nested_type(cls: Any, name: str) -> Any:
    """The config class of field `name` when it is itself a config (model or dataclass), else None."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        fields: dict[str, Any] = dict(cls.model_fields)
    else:
        fields = dict(getattr(cls, "__pydantic_fields__", {}))  # resolved annotations (not strings)
    ann = fields[name].annotation if name in fields else None
    if isinstance(ann, type) and (issubclass(ann, BaseModel) or dataclasses.is_dataclass(ann)):
        return ann
    return None


def check_keys(cls: Any, data: Any, where: str = "") -> None:
    """Refuse keys that are not fields, naming the closest field; recurse into nested configs."""
    if not isinstance(data, dict):
        return
    names = field_names(cls)
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {where + close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key {where + str(key)!r}{hint}")
        sub = nested_type(cls, key)
        if sub is not None:
            check_keys(sub, value, f"{where}{key}.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with a size limit and one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {str(p)!r}{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return data


def build(cls: type[T], source: Any = None, overrides: list[str] | None = None, **fields: Any) -> T:
    """Build config `cls` from an instance, dict or YAML path, then `key=value` overrides (YAML-typed values;
    dotted keys reach nested settings, e.g. `train.lr=1e-3`; a bare key that names a nested field such as `lr`
    is placed there), then keyword fields. Every mistake is a one-line ConfigError."""
    if isinstance(source, BaseModel):
        data = source.model_dump()
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        data = dataclasses.asdict(source)
    elif isinstance(source, dict):
        data = dict(source)
    elif source is None:
        data = {}
    else:
        data = load_yaml(source)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        set_path(cls, data, key.strip(), yaml.safe_load(value))
    for key, value in fields.items():
        set_path(cls, data, key, value)
    return validate(cls, data)


def set_path(cls: Any, data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b] = value for key 'a.b' (nested dicts created as needed); a bare key that names a field of a
    nested config (e.g. `lr` for `train.lr`) is placed there."""
    parts = key.split(".")
    if len(parts) == 1:
        parts = list(_locate(cls, key) or parts)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = dict(child.__dict__) if hasattr(child, "__dataclass_fields__") else {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _locate(cls: Any, name: str) -> tuple[str, ...] | None:
    """The path of field `name` in `cls` or one of its nested configs (first match, top level first)."""
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__pydantic_fields__", {})
    if name in fields:
        return (name,)
    for outer in fields:
        sub = nested_type(cls, outer)
        if sub is not None:
            inner = _locate(sub, name)
            if inner:
                return (outer, *inner)
    return None


def one_line(err: ValidationError, prefix: str = "invalid config: ") -> str:
    """Collapse a pydantic ValidationError into one line naming the field(s)."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(x) for x in item["loc"]) or "config"
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return prefix + "; ".join(parts)


def validate(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict: unknown keys with did-you-mean, then pydantic, every failure a ConfigError."""
    check_keys(cls, data)
    try:
        if issubclass(cls, BaseModel):
            return cls.model_validate(data)  # type: ignore[return-value]
        return cls(**data)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def one_line_errors(cls: type[T]) -> type[T]:
    """Class decorator for pydantic dataclasses: construction errors become `ConfigError("Cls.field: ...")`."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise ConfigError(_prefixed(cls, e)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _prefixed(cls: Any, err: ValidationError) -> str:
    """'Cls.field: message' per error; a message that already names its field (from __post_init__) is kept."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(x) for x in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "unexpected_keyword_argument":
            close = difflib.get_close_matches(loc, field_names(cls), n=1)
            msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        parts.append(msg if not loc else f"{cls.__name__}.{loc}: {msg}")
    return "; ".join(parts)
