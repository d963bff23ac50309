"""Public names imported on first use (PEP 562), so that importing a package costs nothing until one of
its names is touched; and old names kept for a release, with a ``DeprecationWarning``."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def attach(
    package: str,
    exports: Mapping[str, Sequence[str]],
    deprecated: Mapping[str, tuple[str, str, str]] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``.

    ``exports`` maps a module to the names it defines; a name is imported from its module when first
    touched. ``deprecated`` maps an old name to ``(module, name, replacement)``: touching it warns that
    ``replacement`` is the name to use now. Any other attribute is tried as a subpackage
    (``llmprune.api``). Deprecated names are not in ``__all__``.
    """
    module_of = {name: module for module, names in exports.items() for name in names}
    old_names = dict(deprecated or {})

    def __getattr__(name: str) -> Any:
        if name in module_of:
            value = getattr(importlib.import_module(module_of[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        if name in old_names:
            module, new, replacement = old_names[name]
            warnings.warn(
                f"{package}.{name} is deprecated and will be removed in the next release; use {replacement}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(module), new)
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *module_of})

    return __getattr__, __dir__, sorted(module_of)
