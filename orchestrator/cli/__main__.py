"""``python -m orchestrator.cli`` still works, as it did when the CLI was one module."""

from orchestrator.cli import main

main()
