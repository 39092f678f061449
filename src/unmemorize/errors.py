"""Errors a user can fix: they become one line on stderr and exit status 2."""


class InputError(Exception):
    """Bad input (file, flag, config or model). The message is the whole line the user sees."""
