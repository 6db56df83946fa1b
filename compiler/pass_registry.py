"""The registry of passes by name: built-in declarations, registered classes, entry-point and recipe plugins.

Torch-free: a name maps to a :class:`~compiler.pass_config.PassDeclaration` (what the recipe schema needs) until a
compile asks for the pass's code with :func:`get_pass`, which imports the declaring module; importing it registers
the class (``compiler.pass_infra.register_pass``), which then takes the declaration's place.

This is the one module under ``compiler/`` that names the ``passes`` package: :func:`_load_builtins` imports its
torch-free ``passes.options``, which declares every built-in pass.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import TYPE_CHECKING, Union

from .errors import RecipeError
from .pass_config import PassDeclaration

if TYPE_CHECKING:
    from .pass_infra import Pass

# A pass by name: its declaration until its module is imported, then its class.
_REGISTRY: dict[str, Union[PassDeclaration, "type[Pass]"]] = {}
_BUILTINS_LOADED = False


def declare(declaration: PassDeclaration) -> PassDeclaration:
    """Make a pass known by name before its module is imported (built-in passes, from ``passes/options.py``)."""
    existing = _REGISTRY.get(declaration.name)
    if existing is not None and getattr(existing, "module", getattr(existing, "__module__", None)) != declaration.module:
        raise TypeError(f"pass name {declaration.name!r} is already registered by {_origin(existing)}")
    if existing is None or isinstance(existing, PassDeclaration):
        _REGISTRY[declaration.name] = declaration
    return declaration


def _origin(entry) -> str:
    if isinstance(entry, PassDeclaration):
        return entry.module
    return f"{entry.__module__}.{entry.__qualname__}"


def add_class(cls: "type[Pass]") -> None:
    """Record a registered pass class under its name (called by ``register_pass``)."""
    existing = _REGISTRY.get(cls.name)
    if isinstance(existing, PassDeclaration):
        if existing.module != cls.__module__:
            raise TypeError(f"pass name {cls.name!r} is declared by {existing.module}, not {cls.__module__}")
    elif existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name {cls.name!r} is already registered by {_origin(existing)}")
    _REGISTRY[cls.name] = cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    importlib.import_module("passes.options")
    for entry in importlib.metadata.entry_points(group="bertpress.passes"):
        try:
            loaded = entry.load()
        except Exception as exc:  # one broken plugin must not take every recipe down with it
            warnings.warn(f"bertpress: skipped the pass plugin {entry.name!r} ({entry.value}) from the"
                          f" 'bertpress.passes' entry points: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        # Importing the module usually registered it (@register_pass); an undecorated class is registered here.
        if isinstance(loaded, type) and getattr(loaded, "name", None) not in _REGISTRY:
            from .pass_infra import Pass, register_pass

            if issubclass(loaded, Pass):
                register_pass(loaded)


def load_plugins(modules: list[str], *, file: str | None = None) -> None:
    """Import the plugin modules a recipe names (packages without a ``bertpress.passes`` entry point)."""
    for index, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RecipeError(
                f"cannot import plugin module {module!r}: {exc}.",
                file=file, field=f"plugins[{index}]",
                fix="install the package that provides it or fix the module name.",
            ) from None


def declared_passes() -> dict[str, Union[PassDeclaration, "type[Pass]"]]:
    """Every known pass by name, without importing any pass's code (each entry has name, Config, ordering)."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_declaration(name: str) -> Union[PassDeclaration, "type[Pass]", None]:
    _load_builtins()
    return _REGISTRY.get(name)


def summary_of(entry) -> str:
    """One line describing a pass, for the schema."""
    if isinstance(entry, PassDeclaration):
        return entry.summary
    return (entry.__doc__ or "").strip().splitlines()[0] if entry.__doc__ else ""


def get_pass(name: str) -> "type[Pass] | None":
    """The pass class registered under ``name``, importing its module if it was only declared."""
    _load_builtins()
    entry = _REGISTRY.get(name)
    if isinstance(entry, PassDeclaration):
        importlib.import_module(entry.module)
        entry = _REGISTRY.get(name)
        if isinstance(entry, PassDeclaration):
            raise TypeError(f"{entry.module} declares the pass {name!r} but registers no class for it")
    return entry


def registered_passes() -> "dict[str, type[Pass]]":
    """Every pass class by name (imports every declared pass's module, and so torch)."""
    return {name: get_pass(name) for name in declared_passes()}
