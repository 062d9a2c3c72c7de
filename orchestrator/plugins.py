"""Discovery of event functions through the entry-point group ``orchestrator.functions``.

A plugin is broken when its entry point cannot be imported, names something
that is not an :class:`~orchestrator.functions.EventFunction`, or reuses a
function name another plugin already uses for the same integration. Broken
plugins are reported by distribution and entry point; the daemon refuses to
start with any unless told to skip them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from orchestrator.config import Integration
from orchestrator.functions import EventFunction, describe
from orchestrator.model import LifecycleEvent

GROUP = "orchestrator.functions"
RESOLVER_GROUP = "orchestrator.credentials"
"""At most one entry point: an async callable taking a ``ConnectionRef`` and returning fresh credentials
(a mapping of names to strings) or None; asked once when a provider answers 401."""
INTEGRATIONS_GROUP = "orchestrator.integrations"
"""Plugins may ship an integration's default settings: the entry-point name is the integration,
the object a mapping like ``{"base_url": "https://{instance_url}", "auth": "bearer"}``."""
_FUNCTION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class Installed:
    """An event function and the plugin that provides it."""

    name: str
    function: EventFunction
    distribution: str
    version: str
    entry_point: str
    """``module:attribute``, as declared."""


@dataclass(frozen=True, slots=True)
class BrokenPlugin:
    """An entry point that could not be turned into an event function, and why."""

    distribution: str
    version: str
    name: str
    entry_point: str
    reason: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}: entry point {self.name} = {self.entry_point}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Registry:
    """Every installed event function, indexed for dispatch."""

    functions: tuple[Installed, ...] = ()
    broken: tuple[BrokenPlugin, ...] = ()
    _by_event: dict[tuple[str, LifecycleEvent], tuple[Installed, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, functions: Iterable[Installed], broken: Iterable[BrokenPlugin] = ()) -> Registry:
        """A registry of ``functions`` (sorted by integration, event, name)."""
        ordered = tuple(sorted(functions, key=lambda f: (f.function.integration, f.function.event, f.name)))
        index: dict[tuple[str, LifecycleEvent], list[Installed]] = {}
        for item in ordered:
            index.setdefault((item.function.integration, item.function.event), []).append(item)
        return cls(ordered, tuple(broken), {k: tuple(v) for k, v in index.items()})

    def for_event(self, integration: str, event: LifecycleEvent) -> tuple[Installed, ...]:
        """The functions to run for ``event`` of ``integration``."""
        return self._by_event.get((integration, event), ())

    def named(self, name: str, integration: str = "") -> list[Installed]:
        """Functions called ``name`` (of ``integration`` when given)."""
        return [
            f for f in self.functions if f.name == name and (not integration or f.function.integration == integration)
        ]


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Registry:
    """Load every entry point of the group; never raises for a broken plugin."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=GROUP)
    loaded: list[Installed] = []
    broken: list[BrokenPlugin] = []
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
        version = ep.dist.version if ep.dist is not None else "?"

        def fail(reason: str, ep: metadata.EntryPoint = ep, dist: str = dist, version: str = version) -> None:
            broken.append(BrokenPlugin(dist, version, ep.name, ep.value, reason))

        if not _FUNCTION_NAME.fullmatch(ep.name):
            fail("the entry-point name is the function's name: use a-z, 0-9, '_' and '-'")
            continue
        try:
            target = ep.load()
        except (Exception, SystemExit) as exc:  # a plugin's import may raise anything (even sys.exit): reported
            fail(f"import failed: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(target, EventFunction):
            fail(f"{_named(target)} is not an event function (decorate it with @on_event)")
            continue
        problem = target.call_problem()
        if problem is not None:
            fail(problem)
            continue
        loaded.append(Installed(ep.name, target, dist, version, ep.value))
    loaded = _one_name_each(loaded, broken)
    seen: dict[tuple[str, str], Installed] = {}
    unique: list[Installed] = []
    clashes: set[tuple[str, str]] = set()
    for item in loaded:
        key = (item.function.integration, item.name)
        if key in seen:
            clashes.add(key)
        else:
            seen[key] = item
    for item in loaded:
        key = (item.function.integration, item.name)
        if key in clashes:
            others = [
                f"{o.distribution} ({o.entry_point})"
                for o in loaded
                if o is not item and (o.function.integration, o.name) == key
            ]
            broken.append(
                BrokenPlugin(
                    item.distribution,
                    item.version,
                    item.name,
                    item.entry_point,
                    f"function {item.name!r} for integration {item.function.integration!r} is also defined by "
                    + ", ".join(others),
                )
            )
        else:
            unique.append(item)
    return Registry.of(unique, broken)


def _named(target: object) -> str:
    """What an entry point loaded, for a message: a function or class by its whole path, else its type and value."""
    if inspect.isroutine(target) or inspect.isclass(target):
        kind = "class" if inspect.isclass(target) else "function"
        return f"{kind} {describe(target)}"
    return f"{describe(target)} {target!r:.60}"


def _one_name_each(loaded: list[Installed], broken: list[BrokenPlugin]) -> list[Installed]:
    """``loaded`` without the event functions registered under more than one entry point (each is broken: it
    would run once per name for every event)."""
    by_object: dict[int, list[Installed]] = {}
    for item in loaded:
        by_object.setdefault(id(item.function), []).append(item)
    kept = []
    for item in loaded:
        names = by_object[id(item.function)]
        if len(names) == 1:
            kept.append(item)
            continue
        others = ", ".join(f"{o.name} = {o.entry_point} ({o.distribution})" for o in names if o is not item)
        reason = (
            f"{item.function.qualname} is also registered as {others}: one event function takes one entry point"
            " (it would run once per name)"
        )
        broken.append(BrokenPlugin(item.distribution, item.version, item.name, item.entry_point, reason))
    return kept


def discover_resolver(
    entry_points: Iterable[metadata.EntryPoint] | None = None,
) -> tuple[Callable[..., Any] | None, list[BrokenPlugin]]:
    """The credentials resolver, if a plugin ships one; several, or one that does not load, are broken."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=RESOLVER_GROUP)
    found = list(entry_points)
    broken: list[BrokenPlugin] = []
    loaded: list[Callable[..., Any]] = []
    for ep in found:
        dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
        version = ep.dist.version if ep.dist is not None else "?"
        if len(found) > 1:
            others = ", ".join(f"{o.name} = {o.value}" for o in found if o is not ep)
            broken.append(BrokenPlugin(dist, version, ep.name, ep.value, f"one resolver at most; also {others}"))
            continue
        try:
            target = ep.load()
        except (Exception, SystemExit) as exc:  # reported like any broken plugin
            broken.append(BrokenPlugin(dist, version, ep.name, ep.value, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        if not callable(target):
            broken.append(BrokenPlugin(dist, version, ep.name, ep.value, f"{type(target).__name__} is not callable"))
            continue
        loaded.append(target)
    return (loaded[0] if loaded else None), broken


def discover_integrations(
    entry_points: Iterable[metadata.EntryPoint] | None = None,
) -> tuple[dict[str, Integration], list[BrokenPlugin]]:
    """Integration defaults shipped by plugins (the daemon's config overrides them)."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=INTEGRATIONS_GROUP)
    found: dict[str, Integration] = {}
    broken: list[BrokenPlugin] = []
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            settings = ep.load()
            if not isinstance(settings, Mapping):
                raise TypeError(f"{type(settings).__name__} is not a mapping of settings")
            found[ep.name] = Integration.from_settings(ep.name, settings)
        except Exception as exc:  # reported like any broken plugin
            broken.append(BrokenPlugin(dist, version, ep.name, ep.value, f"{type(exc).__name__}: {exc}"))
    return found, broken


def integrations(
    configured: Mapping[str, Integration], entry_points: Iterable[metadata.EntryPoint] | None = None
) -> tuple[dict[str, Integration], list[BrokenPlugin]]:
    """Every integration's settings: the defaults plugins ship, each replaced by the configured one of its name.

    Also the plugins whose defaults could not be loaded (they are left out).
    """
    defaults, broken = discover_integrations(entry_points)
    return {**defaults, **configured}, broken
