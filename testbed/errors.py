"""The one exception type a user can cause and fix.

The CLI prints its message on one line and exits with code 2 (no traceback).
"""


class UserError(Exception):
    """A problem in the user's input (path, flag, file, value) with a message naming the fix."""
