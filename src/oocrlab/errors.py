"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input or state the user can fix: the message says what is wrong and how to fix it."""
