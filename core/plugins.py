"""The plugin manager and the registries the hooks fill.

Built-in features are plugin modules listed in ``DEFAULT_PLUGINS`` and are loaded
exactly like third-party plugins, which are found through the ``rwft`` entry-point
group. ``RWFT_LOAD_PLUGINS`` restricts which third-party plugins load: unset loads
all, an empty string loads none (the test suite sets that, so that installed
plugins never change test results), ``a,b`` loads only those entry-point names.
``RWFT_TRACE_HOOKS=1`` prints every hook call.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rwft.core import hookspecs
from rwft.core.errors import PluginError

DEFAULT_PLUGINS: tuple[str, ...] = (
    "rwft.plugins.backbones_timm",
    "rwft.plugins.backbones_torchvision",
    "rwft.plugins.backbones_efficientnet_lite",
    "rwft.plugins.adapters",
    "rwft.plugins.datasets_chest_xray",
    "rwft.plugins.datasets_medmnist",
    "rwft.plugins.strategies",
    "rwft.plugins.strategies_dp",
    "rwft.plugins.commands",
)

KINDS = ("backbones", "adapters", "strategies", "datasets", "commands")


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str


class Registry:
    """Name -> factory for one kind of feature, remembering which plugin gave it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Registration] = {}

    def add(self, registration: Registration) -> None:
        existing = self._entries.get(registration.name)
        if existing is not None:
            raise PluginError(
                f"{self.kind[:-1]} {registration.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} and by plugin {registration.plugin!r}. Rename one of "
                "them, or uninstall/disable one plugin (RWFT_LOAD_PLUGINS)."
            )
        self._entries[registration.name] = registration

    def get(self, name: str) -> Registration:
        try:
            return self._entries[name]
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (
            f"unknown {self.kind[:-1]} {name!r}.{hint} Known {self.kind}: "
            f"{', '.join(sorted(self._entries))}. Run `rwft plugins` to see every "
            "registered name and the plugin that provides it."
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Registration]:
        return iter(sorted(self._entries.values(), key=lambda r: r.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


@dataclass(frozen=True)
class Registries:
    backbones: Registry
    adapters: Registry
    strategies: Registry
    datasets: Registry
    commands: Registry

    def of(self, kind: str) -> Registry:
        return getattr(self, kind)


def _allowed_entry_points() -> set[str] | None:
    raw = os.environ.get("RWFT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def make_plugin_manager(extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager: built-ins, allowed entry points, then ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    allowed = _allowed_entry_points()
    for ep in entry_points(group=hookspecs.PROJECT_NAME):
        if allowed is not None and ep.name not in allowed:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"the rwft plugin {ep.name!r} ({ep.value}, from distribution "
                f"{getattr(ep.dist, 'name', '?')}) failed to import: {exc}. Fix or "
                "uninstall it, or exclude it with RWFT_LOAD_PLUGINS."
            ) from exc
        pm.register(plugin, name=ep.name)
    for plugin in extra_plugins:
        pm.register(plugin)
    # A misspelled hook name in any plugin (e.g. ``register_backbone``) fails here.
    pm.check_pending()
    if os.environ.get("RWFT_TRACE_HOOKS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    return pm


def collect_registries(pm: pluggy.PluginManager) -> Registries:
    registries = Registries(*(Registry(kind) for kind in KINDS))
    for kind in KINDS:
        hook = getattr(pm.hook, f"register_{kind}")
        registry = registries.of(kind)
        plugins = [impl.plugin for impl in hook.get_hookimpls()]
        for plugin in plugins:
            plugin_name = pm.get_name(plugin) or repr(plugin)

            def register(name: str, factory: Callable[..., Any], description: str = "",
                         _plugin: str = plugin_name, _registry: Registry = registry) -> None:
                _registry.add(Registration(name, factory, _plugin, description))

            # Call the hook through pluggy (tracing, wrappers) but one plugin at a
            # time, so that every registration knows which plugin made it.
            others = [p for p in plugins if p is not plugin]
            pm.subset_hook_caller(f"register_{kind}", remove_plugins=others)(register=register)
    return registries


@lru_cache(maxsize=1)
def _default_registries() -> Registries:
    return collect_registries(make_plugin_manager())


def get_registries() -> Registries:
    """The registries of the built-in and installed plugins (built once per process)."""
    return _default_registries()


def reset_registries() -> None:
    """Forget the cached registries (after installing or registering a plugin)."""
    _default_registries.cache_clear()
