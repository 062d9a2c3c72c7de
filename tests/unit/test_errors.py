"""The error tree: drawn in one docstring, every class mapped to a gRPC status code."""

from __future__ import annotations

import re

import grpc

from orchestrator import errors
from orchestrator.rpc.server import STATUS_CODES, status_code


def every_error() -> list[type[errors.OrchestratorError]]:
    """Every subclass of ``OrchestratorError`` defined in the package, the base included."""
    found: list[type[errors.OrchestratorError]] = [errors.OrchestratorError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__.startswith("orchestrator")]


def test_every_error_class_lives_in_errors_and_is_drawn_in_its_tree() -> None:
    """Each error class is defined in ``orchestrator.errors`` and named in the module's tree."""
    doc = errors.__doc__ or ""
    for cls in every_error():
        assert cls.__module__ == "orchestrator.errors", f"{cls.__qualname__} lives in {cls.__module__}"
        assert re.search(rf"[ ─]{cls.__name__}\s", doc), f"{cls.__name__} is missing from the tree in errors.py"


def test_every_error_maps_to_a_status_code_other_than_unknown() -> None:
    """No error of ours reaches a client as UNKNOWN: each has a mapped class in its ancestry."""
    for cls in every_error()[1:]:
        error = cls("x") if cls is not errors.VersionConflict else cls("s", 1, 2)
        assert status_code(error) is not grpc.StatusCode.UNKNOWN, cls.__name__


def test_the_race_errors_are_retryable_codes() -> None:
    """A job claimed or started meanwhile is ABORTED (retry the call); a broken plugin a precondition."""
    assert STATUS_CODES[errors.LeaseLost] is grpc.StatusCode.ABORTED
    assert STATUS_CODES[errors.PluginError] is grpc.StatusCode.FAILED_PRECONDITION
    assert STATUS_CODES[errors.ProviderError] is grpc.StatusCode.UNAVAILABLE
