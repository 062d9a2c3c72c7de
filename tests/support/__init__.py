"""Helpers shared by several test suites (a scriptable local HTTP provider, ...)."""
