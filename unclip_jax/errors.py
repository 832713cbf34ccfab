"""The one exception family the ``unclip-jax`` command reports without a traceback.

Raise a subclass of :class:`UserError` for anything a user can fix (a bad flag, a missing file,
a corrupt checkpoint, an empty prompt). Its message must say what was wrong and what to do; the CLI
prints it on one line and exits with status 2. Subclass it together with a builtin
(``class X(UserError, ValueError)``) where callers may already catch the builtin.
"""


class UserError(Exception):
    """An error whose message tells the user what to fix."""
