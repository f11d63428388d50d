"""Errors a user can act on.

Anything raised as a `UserError` is printed as one paragraph (no traceback) by the entry points: it names the
field or path at fault and what would be accepted instead.
"""


class UserError(Exception):
    """A problem with the user's input (config, paths, data) that they can fix."""


class ConfigError(UserError):
    """A config value or combination of values is invalid; raised at compose time, before anything heavy loads."""
