"""The one exception type for a user's mistake.

A ``UserError`` carries one clear sentence. The command line prints it and exits with status 2;
the service turns it into a 4xx answer. Anything else is a bug and keeps its traceback.

Example:
    >>> raise UserError("no teacher file at 'missing.safetensors'")
    Traceback (most recent call last):
    ...
    datafree.base.errors.UserError: no teacher file at 'missing.safetensors'
"""


class UserError(Exception):
    """A mistake in what the user handed us (a path, a name, a shape, a file's contents)."""
