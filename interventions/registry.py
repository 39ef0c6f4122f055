"""The registry of saveable module classes: what `load_interventions` can rebuild, by class name.

A class registers itself by subclassing `Saveable` (every `Intervention` and `Rotation` does), under
its name for the library's own classes and ``module.QualName`` for others, or under
``class Mine(Intervention, saved_name="..."):``. Each instance remembers its constructor arguments,
which `save_interventions` writes beside its parameters and buffers.
"""

from __future__ import annotations

from types import MappingProxyType

_REGISTRY: dict[str, type] = {}


def saved_name(cls: type) -> str:
    """The name a class is saved under."""
    return cls._saved_name


def _default_name(cls: type) -> str:
    if cls.__module__.split(".")[0] == "interventions":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


class Saveable:
    """Mixin for `nn.Module`s that `save_interventions` can write: registered, constructor args kept."""

    def __init_subclass__(cls, saved_name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._saved_name = saved_name or _default_name(cls)
        _REGISTRY[cls._saved_name] = cls  # a redefinition (re-import) replaces the old class

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__["_saved_args"] = (args, kwargs)  # before nn.Module.__init__; plain attribute
        return obj


def registered() -> MappingProxyType:
    """Saved name -> class, for every saveable class defined so far."""
    return MappingProxyType(_REGISTRY)
