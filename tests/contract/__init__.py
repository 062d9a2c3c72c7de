"""The one contract every event-store backend passes."""
