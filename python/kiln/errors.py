"""Kiln's user-facing error and warning types."""


class KilnError(Exception):
    """Raised for anything a user can fix: bad input, an unsupported model, a wrong call."""


class KilnWarning(UserWarning):
    """Something worked but not as well as it could: the message says what to change."""
