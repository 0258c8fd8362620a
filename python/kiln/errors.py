"""Kiln's user-facing error type."""


class KilnError(Exception):
    """Raised for anything a user can fix: bad input, an unsupported model, a wrong call."""
