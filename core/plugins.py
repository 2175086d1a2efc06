"""The plugin manager and the registries the hooks fill.

Built-in features are plugin modules listed in ``DEFAULT_PLUGINS`` and are loaded
exactly like third-party plugins, which are found through the ``rwft`` entry-point
group. ``RWFT_LOAD_PLUGINS`` restricts which third-party plugins load: unset loads
all, an empty string loads none (the test suite sets that, so that installed
plugins never change test results), ``a,b`` loads only those entry-point names.
``RWFT_TRACE_HOOKS=1`` prints every hook call.

A third-party plugin that fails to import or to register is reported on stderr and
left out, so that one broken package does not stop every command;
``RWFT_STRICT_PLUGINS=1`` (for CI) makes that an error. A name in
``RWFT_LOAD_PLUGINS`` that no installed plugin has is an error. Factories are called
through ``call_factory``, which checks their results and names the plugin and its
distribution when they fail.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rwft.core import hookspecs
from rwft.core.errors import PluginError, RwftError

DEFAULT_PLUGINS: tuple[str, ...] = (
    "rwft.plugins.backbones_timm",
    "rwft.plugins.backbones_torchvision",
    "rwft.plugins.backbones_efficientnet_lite",
    "rwft.plugins.adapters",
    "rwft.plugins.datasets_chest_xray",
    "rwft.plugins.datasets_medmnist",
    "rwft.plugins.datasets_dicom",
    "rwft.plugins.strategies",
    "rwft.plugins.strategies_feddyn",
    "rwft.plugins.strategies_dp",
    "rwft.plugins.commands",
    "rwft.plugins.commands_hospital",
    "rwft.plugins.commands_experiments",
)

KINDS = ("backbones", "adapters", "strategies", "datasets", "commands")


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str
    distribution: str = "rwft"  # the installed package that provides the plugin
    kind: str = ""  # backbone, adapter, strategy, dataset, command


class Registry:
    """Name -> factory for one kind of feature, remembering which plugin gave it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.one = "strategy" if kind == "strategies" else kind.removesuffix("s")  # "unknown strategy", not "strategie"
        self._entries: dict[str, Registration] = {}

    def add(self, registration: Registration) -> None:
        if not registration.kind:
            registration = dataclasses.replace(registration, kind=self.one)
        existing = self._entries.get(registration.name)
        if existing is not None:
            raise PluginError(
                f"{self.one} {registration.name!r} is registered twice: by plugin "
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
            f"unknown {self.one} {name!r}.{hint} Known {self.kind}: "
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


STRICT_ENV = "RWFT_STRICT_PLUGINS"


def strict_plugins() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def broken_plugin(message: str) -> None:
    """A third-party plugin failed: an error under ``RWFT_STRICT_PLUGINS=1``, else reported and skipped."""
    if strict_plugins():
        raise PluginError(message + f" ({STRICT_ENV} is set, so this stops rwft.)")
    print(f"rwft: warning: {message} It is left out; the other plugins work.", file=sys.stderr)


def make_plugin_manager(extra_plugins: tuple[object, ...] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager: built-ins, allowed entry points, then ``extra_plugins``.

    ``pm.rwft_distributions`` maps each plugin's name to its distribution's name.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    distributions: dict[str, str] = {}
    pm.rwft_distributions = distributions  # type: ignore[attr-defined]
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        distributions[module_name] = "rwft"
    allowed = _allowed_entry_points()
    found = list(entry_points(group=hookspecs.PROJECT_NAME))
    if allowed:
        unknown = sorted(allowed - {ep.name for ep in found})
        if unknown:
            raise PluginError(f"RWFT_LOAD_PLUGINS names {', '.join(unknown)}, which no installed package provides "
                              f"(installed rwft plugins: {', '.join(sorted(ep.name for ep in found)) or 'none'}). "
                              "Fix the name, or install the plugin.")
    for ep in found:
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep.dist, "name", "?")
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            broken_plugin(f"the rwft plugin {ep.name!r} ({ep.value}, from distribution {dist}) failed to "
                          f"import: {type(exc).__name__}: {exc}. Fix or uninstall it, or exclude it with "
                          "RWFT_LOAD_PLUGINS.")
            continue
        pm.register(plugin, name=ep.name)
        distributions[ep.name] = dist
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

            distribution = getattr(pm, "rwft_distributions", {}).get(plugin_name, "?")

            def register(name: str, factory: Callable[..., Any], description: str = "",
                         _plugin: str = plugin_name, _registry: Registry = registry,
                         _distribution: str = distribution) -> None:
                _registry.add(Registration(name, factory, _plugin, description, _distribution, _registry.one))

            # Call the hook through pluggy (tracing, wrappers) but one plugin at a
            # time, so that every registration knows which plugin made it.
            others = [p for p in plugins if p is not plugin]
            try:
                pm.subset_hook_caller(f"register_{kind}", remove_plugins=others)(register=register)
            except PluginError:
                raise  # a duplicate name: both plugins are named already
            except Exception as exc:
                distribution = getattr(pm, "rwft_distributions", {}).get(plugin_name, "?")
                if distribution == "rwft":
                    raise
                broken_plugin(f"the rwft plugin {plugin_name!r} (distribution {distribution}) failed in "
                              f"register_{kind}: {type(exc).__name__}: {exc}.")
    return registries


def describe_registration(registration: Registration) -> str:
    """``backbone 'x' of plugin 'p' (distribution d)``: who to blame, in messages."""
    what = f"{registration.kind} {registration.name!r}".strip()
    return f"{what} of plugin {registration.plugin!r} (distribution {registration.distribution})"


def call_factory(registration: Registration, promise: str, fulfils: Callable[[Any], bool],
                 *args: Any, **kwargs: Any) -> Any:
    """``registration.factory(*args, **kwargs)``, checked at the plugin's border.

    An ``RwftError`` the factory raises (a user's mistake it explains) passes through;
    any other exception, or a result for which ``fulfils`` is false (``promise`` says
    what the contract asks for), becomes a ``PluginError`` naming the plugin and its
    distribution, so that nobody hunts for the fault in rwft's own code.
    """
    try:
        result = registration.factory(*args, **kwargs)
    except RwftError:
        raise
    except Exception as exc:
        raise PluginError(f"{describe_registration(registration)} failed: {type(exc).__name__}: {exc}. "
                          "Fix or update the plugin, or choose another name.") from exc
    if not fulfils(result):
        raise PluginError(f"{describe_registration(registration)} returned a {type(result).__name__}, not "
                          f"{promise} as its hook's contract says (rwft.core.hookspecs). Fix or update the plugin.")
    return result


@lru_cache(maxsize=1)
def _default_registries() -> Registries:
    return collect_registries(make_plugin_manager())


def get_registries() -> Registries:
    """The registries of the built-in and installed plugins (built once per process)."""
    return _default_registries()


def reset_registries() -> None:
    """Forget the cached registries (after installing or registering a plugin)."""
    _default_registries.cache_clear()
