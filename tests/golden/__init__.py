"""Golden event logs written by earlier releases, replayed by today's code (see README.md)."""
