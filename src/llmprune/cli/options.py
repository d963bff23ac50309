"""Click options generated from the pydantic configs, so each option is defined in exactly one place.

Flags carry no defaults of their own: only what the user typed is passed on, on top of a recipe, and the
config's defaults apply to the rest. Values are converted and validated by pydantic, once.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from llmprune.config import spellings


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _option(name: str, info: FieldInfo) -> click.Option:
    flags = ["--" + spelled.replace("_", "-") for spelled in spellings(name, info)]  # the older ones too
    annotation = info.annotation
    origin = typing.get_origin(annotation)
    default = info.get_default(call_default_factory=True)
    shown = "" if info.is_required() or default in (None, [], {}) else f" [default: {default}]"
    help_text = (info.description or "") + shown
    if annotation is bool:
        switches = [f"{flag}/--no-{flag[2:]}" for flag in flags]
        return click.Option([*switches, name], default=None, help=help_text)
    if origin in (list, dict):
        return click.Option([*flags, name], multiple=True, help=help_text + " (repeatable)")
    choices = _choices(annotation)
    kind = click.Choice(choices) if choices else click.STRING
    return click.Option([*flags, name], type=kind, default=None, help=help_text)


def config_options(model: type[BaseModel], skip: tuple[str, ...] = ()) -> Callable:
    """Decorator adding one click option per field of ``model``."""

    def decorate(command: Callable) -> Callable:
        params = getattr(command, "__click_params__", [])
        for name, info in reversed(list(model.model_fields.items())):
            if name not in skip:
                params.append(_option(name, info))
        command.__click_params__ = params
        return command

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually typed (click reports absent ones as None or an empty tuple)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v not in (None, ())}
