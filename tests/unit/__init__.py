"""Unit tests: pure code and in-process backends, no network, no sleeps."""
