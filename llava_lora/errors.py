"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). The message names the cause."""


class RunFailed(Exception):
    """A stage ran but could not do its job (e.g. training that met no supervised token): exit code 1."""
