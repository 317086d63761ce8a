"""Command-line flags generated from config fields, so each option's default and help are written once.

A job config (`actstore.schemas.jobs`) is flattened: its own fields and those of the settings it nests
(`sae.*`, `train.*`, `probe.*`) each become one `--flag` (field name with dashes), typed from the annotation
(Literal -> choices, bool -> --x/--no-x, lists -> repeatable), with the field's docstring and default as help.
Flags default to "not given", so a YAML config and `--set` overrides stay in force unless a flag says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import yaml
from pydantic import BaseModel

# Field path -> (flag, extra argparse options) where the plain rule would read badly.
SPECIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "hooks": ("--hook", {"action": "append", "metavar": "HOOK", "extra": " (repeatable)"}),
    "sweep": ("--sweep", {"nargs": "+", "metavar": "KEY=V1,V2", "extra": " e.g. --sweep k=32,64 expansion=8,16"}),
    "exclude_special": ("--include-special", {"action": "store_false", "extra": " (flag: keep them)"}),
    "storage_options": ("--storage-options", {"metavar": "JSON"}),
}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated flag: where its value goes and how argparse reads it."""

    path: str  # dotted field path in the job (e.g. "train.lr")
    flag: str
    dest: str
    annotation: Any
    default: Any
    doc: str


def _fields(cls: Any) -> Iterator[tuple[str, Any, Any, str]]:
    """(name, annotation, default, docstring) of a pydantic model or pydantic dataclass."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        items = cls.model_fields.items()
    else:
        items = cls.__pydantic_fields__.items()
    for name, info in items:
        default = info.get_default(call_default_factory=True) if not info.is_required() else None
        yield name, info.annotation, default, " ".join((info.description or "").split())


def _is_config(ann: Any) -> bool:
    return isinstance(ann, type) and (issubclass(ann, BaseModel) or dataclasses.is_dataclass(ann))


FIRST = ("store", "hooks", "in_hook", "out_hook", "label", "out")  # what a newcomer looks for first in --help


def flags_of(job_cls: type[BaseModel], skip: tuple[str, ...] = ()) -> list[Flag]:
    """Every flag of a job: the key fields first, then its other fields, then each nested config's."""
    out: list[Flag] = []
    for name, ann, default, doc in _fields(job_cls):
        if name in skip:
            continue
        if _is_config(ann):
            for sub, sann, sdefault, sdoc in _fields(ann):
                if f"{name}.{sub}" in skip:  # a nested setting this job refuses (e.g. sae.skip for a CLT)
                    continue
                out.append(Flag(f"{name}.{sub}", "--" + sub.replace("_", "-"), f"{name}__{sub}", sann, sdefault, sdoc))
        else:
            flag = SPECIAL.get(name, ("--" + name.replace("_", "-"), {}))[0]
            out.append(Flag(name, flag, name, ann, default, doc))
    return sorted(out, key=lambda f: FIRST.index(f.path) if f.path in FIRST else len(FIRST))


def add_job_flags(parser: argparse.ArgumentParser, job_cls: type[BaseModel], skip: tuple[str, ...] = (),
                  aliases: dict[str, str] | None = None) -> None:
    """Add one flag per field of `job_cls` (see the module docstring); `aliases` adds short forms (path -> -o)."""
    group = parser.add_argument_group(f"{job_cls.__name__} fields (also settable in the YAML config or with --set)")
    for f in flags_of(job_cls, skip):
        names = [a for p, a in (aliases or {}).items() if p == f.path] + [f.flag]
        group.add_argument(*names, dest=f.dest, default=argparse.SUPPRESS, **_argparse_options(f))


def _argparse_options(f: Flag) -> dict[str, Any]:
    special = dict(SPECIAL.get(f.path, ("", {}))[1])
    extra = special.pop("extra", "")
    default_text = "" if f.default in (None, {}, []) else f" (default: {f.default})"
    opts: dict[str, Any] = {"help": (f.doc + extra + default_text).replace("%", "%%")}
    if special:
        return {**opts, **special}
    base, optional = _unwrap(f.annotation)
    if typing.get_origin(base) is Literal:
        return {**opts, "choices": list(typing.get_args(base)), "type": type(typing.get_args(base)[0])}
    if base is bool:
        return {**opts, "action": argparse.BooleanOptionalAction}
    if base in (int, float, str):
        metavar = f.path.rsplit(".", 1)[-1].upper() if base is str else base.__name__.upper()
        return {**opts, "type": _nullable(base) if optional else base, "metavar": metavar}
    return {**opts, "type": yaml.safe_load, "metavar": "YAML"}


def _unwrap(ann: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return ann, False


def _nullable(cast: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else cast(text)

    parse.__name__ = cast.__name__  # argparse names the type in its error message
    return parse


def job_fields(args: argparse.Namespace, job_cls: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags given on the command line, as {dotted field path: value}."""
    out: dict[str, Any] = {}
    for f in flags_of(job_cls, skip):
        if hasattr(args, f.dest):
            out[f.path] = _convert(f.path, getattr(args, f.dest))
    return out


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """--storage-options JSON -> dict (None when not given)."""
    from actstore.schemas.errors import ConfigError

    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--storage-options: not valid JSON ({e}); e.g. '{{\"anon\": true}}'") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options: give a JSON object of fsspec options, e.g. '{\"anon\": true}'")
    return value


def _convert(path: str, value: Any) -> Any:
    if path == "storage_options":
        return parse_storage_options(value) or {}
    if path == "sweep":
        return parse_sweep(value)
    return value


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """['k=32,64', 'expansion=8,16'] -> {'k': [32, 64], 'expansion': [8, 16]} (values YAML-typed)."""
    from actstore.schemas.errors import ConfigError

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, vals = item.partition("=")
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,... (e.g. k=32,64)")
        grid[key.strip()] = [yaml.safe_load(v) for v in vals.split(",")]
    return grid


def narrow_choices(parser: argparse.ArgumentParser, path: str, choices: tuple[str, ...], why: str) -> None:
    """Offer only `choices` for the flag of field `path` (a job that accepts a subset of a shared setting's values),
    so --help and argparse's own error list what this job takes."""
    dest = path.replace(".", "__")
    for action in parser._actions:
        if action.dest == dest:
            action.choices = list(choices)
            action.help = f"{' | '.join(choices)} ({why})"
            return
    raise KeyError(path)

