"""The orchestrator's tests (a package, so that pytest puts the project root on ``sys.path``)."""
