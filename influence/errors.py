"""The one kind of failure a user should see as a single line (exit code 2)."""


class UserError(Exception):
    """Bad input or settings: printed as ``error: <message>`` and the script exits with code 2."""
