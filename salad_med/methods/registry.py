"""The method registry: ``train.method`` name -> :class:`~salad_med.methods.base.AnomalyMethod` subclass.

Every module and sub-package of :mod:`salad_med.methods` is imported once, on first use, and each
registers its methods with :func:`register_method`. Adding a method is one new module (plus its tests):
nothing else in the code base lists method names.

Example:
    >>> available_methods()
    ['dae', 'deep_svdd', 'memdae', 'salad', 'salad_no_agg', 'salad_no_rec', ...]
    >>> get_method("salad").paper
    'Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856'
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TYPE_CHECKING, TypeVar

from salad_med.errors import ConfigError

if TYPE_CHECKING:
    from salad_med.methods.base import AnomalyMethod

__all__ = ["register_method", "get_method", "available_methods", "method_table"]

_REGISTRY: dict[str, type[AnomalyMethod]] = {}
_LOCK = threading.Lock()
_LOADED = False
#: modules of salad_med.methods that hold no method
_SKIP = {"base", "registry", "components"}

M = TypeVar("M", bound="type[AnomalyMethod]")


def register_method(cls: M) -> M:
    """Class decorator: register ``cls`` under ``cls.name``.

    Raises:
        ValueError: no name, or the name is taken by another class.
    """
    name = getattr(cls, "name", "")
    if not name:
        msg = f"{cls.__name__} has no `name`"
        raise ValueError(msg)
    other = _REGISTRY.get(name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        msg = f"method name {name!r} is registered twice ({other.__module__}.{other.__qualname__} and " \
              f"{cls.__module__}.{cls.__qualname__})"
        raise ValueError(msg)
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        import salad_med.methods as pkg

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_") or info.name in _SKIP:
                continue
            importlib.import_module(f"salad_med.methods.{info.name}")
        _LOADED = True


def available_methods() -> list[str]:
    """Sorted registered method names."""
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[AnomalyMethod]:
    """The method class registered as ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        msg = f"train.method: unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})"
        raise ConfigError(msg) from None


def method_table() -> list[tuple[str, str, str]]:
    """``(name, title, paper)`` of every method, sorted by name (for ``--help`` and docs)."""
    return [(n, get_method(n).title, get_method(n).paper) for n in available_methods()]
