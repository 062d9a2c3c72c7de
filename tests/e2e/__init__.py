"""End-to-end tests: the ``orchestrator`` command run as a subprocess, as a user would run it."""
