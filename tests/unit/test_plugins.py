"""Discovery of event functions through entry points, with fake entry points pointing at test modules."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from orchestrator.model import LifecycleEvent
from orchestrator.plugins import GROUP, BrokenPlugin, Installed, Registry, discover

from . import _plugin_fixtures as fixtures

MODULE = "tests.unit._plugin_fixtures"
UNKNOWN = "(unknown distribution)"


def ep(name: str, target: str) -> EntryPoint:
    """An entry point of the functions group, with no distribution (as in a test)."""
    return EntryPoint(name, target if ":" in target else f"{MODULE}:{target}", GROUP)


GOOD = [
    ep("check-token", "check_token"),
    ep("register-webhook", "register_webhook"),
    ep("sync-contacts", "sync_contacts"),
    ep("delete-webhook", "delete_webhook"),
    ep("check-token-globex", "globex_check"),
]


def broken_by_name(registry: Registry) -> dict[str, list[BrokenPlugin]]:
    """The registry's broken entries, grouped by entry-point name."""
    out: dict[str, list[BrokenPlugin]] = {}
    for broken in registry.broken:
        out.setdefault(broken.name, []).append(broken)
    return out


def test_good_entry_points_are_indexed_by_integration_and_event() -> None:
    """Each function is found under its integration and event, named by its entry point."""
    registry = discover(GOOD)

    assert registry.broken == ()
    assert [f.name for f in registry.for_event("acme", LifecycleEvent.VALIDATE_CONNECTION)] == ["check-token"]
    assert [f.name for f in registry.for_event("acme", LifecycleEvent.POST_CONNECTION_CREATION)] == [
        "register-webhook",
        "sync-contacts",
    ]
    assert [f.name for f in registry.for_event("acme", LifecycleEvent.PRE_CONNECTION_DELETION)] == ["delete-webhook"]
    assert [f.name for f in registry.for_event("globex", LifecycleEvent.VALIDATE_CONNECTION)] == ["check-token-globex"]
    assert registry.for_event("globex", LifecycleEvent.PRE_CONNECTION_DELETION) == ()
    assert registry.for_event("initech", LifecycleEvent.VALIDATE_CONNECTION) == ()


def test_an_installed_function_names_its_plugin() -> None:
    """Without a distribution (a bare entry point) the plugin is "(unknown distribution)", version "?"."""
    registry = discover([ep("register-webhook", "register_webhook")])

    assert registry.functions == (
        Installed("register-webhook", fixtures.register_webhook, UNKNOWN, "?", f"{MODULE}:register_webhook"),
    )


def test_registry_lookup_by_name() -> None:
    """named() finds functions by name, optionally within one integration."""
    registry = discover(GOOD)

    assert [f.function for f in registry.named("check-token")] == [fixtures.check_token]
    assert registry.named("check-token", "globex") == []
    assert registry.named("nope") == []


def test_an_import_error_is_reported_not_raised() -> None:
    """A module that fails to import, or is missing, is reported with the exception; the rest still load."""
    registry = discover(
        [
            *GOOD,
            ep("raises", "tests.unit._plugin_raises:check"),
            ep("missing-module", "tests.unit._no_such_module:check"),
            ep("missing-attribute", "no_such_attribute"),
        ]
    )

    broken = broken_by_name(registry)
    assert set(broken) == {"raises", "missing-module", "missing-attribute"}
    assert broken["raises"][0].reason == "import failed: RuntimeError: the plugin needs SALESFORCE_REGION set"
    assert broken["missing-module"][0].reason.startswith("import failed: ModuleNotFoundError")
    assert broken["missing-attribute"][0].reason.startswith("import failed: AttributeError")
    assert broken["raises"][0].entry_point == "tests.unit._plugin_raises:check"
    assert broken["raises"][0].distribution == UNKNOWN
    assert len(registry.functions) == len(GOOD)


def test_a_plugin_calling_sys_exit_at_import_is_reported_by_name() -> None:
    """A plugin whose import calls sys.exit is a broken plugin named like any other; discovery goes on."""
    registry = discover([*GOOD, ep("exits", "tests.unit._plugin_exits:check")])

    broken = broken_by_name(registry)
    assert broken["exits"][0].reason == "import failed: SystemExit: 3"
    assert len(registry.functions) == len(GOOD)


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("undecorated", f"function {MODULE}.undecorated"),
        ("NOT_A_FUNCTION", "a builtins.dict instance {'event': 'validate-connection'}"),
    ],
)
def test_an_object_that_is_not_an_event_function_is_reported(target: str, named: str) -> None:
    """An entry point naming anything but an @on_event function is broken, naming the object by its whole module
    path (never cut), with a hint to decorate it."""
    registry = discover([ep("wrong", target)])

    assert registry.functions == ()
    (broken,) = registry.broken
    assert (broken.name, broken.entry_point) == ("wrong", f"{MODULE}:{target}")
    assert broken.reason == f"{named} is not an event function (decorate it with @on_event)"


@pytest.mark.parametrize(
    ("target", "signature"),
    [("takes_nothing", "()"), ("takes_two", "(ctx, extra)"), ("takes_the_context_by_keyword", "(*, ctx)")],
)
def test_a_function_that_does_not_take_the_context_alone_is_reported(target: str, signature: str) -> None:
    """A function the runner could not call with the context alone is a broken plugin at discovery, named with its
    entry point: not a TypeError at each of its attempts."""
    registry = discover([*GOOD, ep("wrong", target)])

    assert len(registry.functions) == len(GOOD)
    (broken,) = registry.broken
    assert str(broken) == (
        f"{UNKNOWN} ?: entry point wrong = {MODULE}:{target}: {MODULE}.{target}{signature} cannot be called with"
        f" the context alone: an event function takes exactly one parameter, the context (def {target}(ctx): ...)"
    )


def test_a_second_parameter_with_a_default_is_fine() -> None:
    """def f(ctx, verbose=False) can be called with the context alone: it loads."""
    registry = discover([ep("optional", "takes_an_option")])

    assert (registry.broken, [f.name for f in registry.functions]) == ((), ["optional"])


def test_one_function_under_two_entry_points_is_reported_under_both() -> None:
    """The same event function named twice would run twice per event: each entry point is broken, naming the
    other; the rest load."""
    registry = discover([*GOOD, ep("register-again", "register_webhook")])

    assert [f.name for f in registry.functions] == [
        f.name for f in discover(GOOD).functions if f.name != "register-webhook"
    ]
    broken = {b.name: b.reason for b in registry.broken}
    assert broken == {
        "register-webhook": f"{MODULE}.register_webhook is also registered as register-again ="
        f" {MODULE}:register_webhook ({UNKNOWN}): one event function takes one entry point (it would run once per"
        " name)",
        "register-again": f"{MODULE}.register_webhook is also registered as register-webhook ="
        f" {MODULE}:register_webhook ({UNKNOWN}): one event function takes one entry point (it would run once per"
        " name)",
    }


def test_two_functions_with_one_name_for_one_integration_are_both_reported() -> None:
    """A name clash within an integration reports both entry points, each naming the other; neither loads."""
    registry = discover([*GOOD, ep("dup", "duplicate_a"), ep("dup", "duplicate_b")])

    assert "dup" not in {f.name for f in registry.functions}
    assert len(registry.functions) == len(GOOD)
    clashes = broken_by_name(registry)["dup"]
    assert sorted(b.entry_point for b in clashes) == [f"{MODULE}:duplicate_a", f"{MODULE}:duplicate_b"]
    for broken in clashes:
        other = "duplicate_b" if broken.entry_point.endswith("duplicate_a") else "duplicate_a"
        assert "function 'dup' for integration 'acme' is also defined by" in broken.reason
        assert f"{MODULE}:{other}" in broken.reason


def test_one_name_in_two_integrations_is_no_clash() -> None:
    """The same function name may be used by different integrations."""
    registry = discover([ep("check", "check_token"), ep("check", "globex_check")])

    assert registry.broken == ()
    assert {f.function.integration for f in registry.named("check")} == {"acme", "globex"}


@pytest.mark.parametrize("name", ["Check-Token", "check token", "-check", "check.token", "a" * 64])
def test_a_bad_entry_point_name_is_reported(name: str) -> None:
    """The entry-point name is the function's name: it must be a valid name, and is not even imported otherwise."""
    registry = discover([ep(name, "tests.unit._plugin_raises:check")])

    assert registry.functions == ()
    (broken,) = registry.broken
    assert broken.name == name
    assert "the entry-point name is the function's name" in broken.reason


def test_a_broken_plugin_reads_as_distribution_and_entry_point() -> None:
    """str(BrokenPlugin) names the distribution, version, entry point and reason, for the daemon's refusal."""
    (broken,) = discover([ep("wrong", "undecorated")]).broken

    assert str(broken).startswith(f"{UNKNOWN} ?: entry point wrong = {MODULE}:undecorated: function ")
    assert str(broken).endswith("is not an event function (decorate it with @on_event)")
