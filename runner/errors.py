"""Errors that are the user's to fix: they exit with code 2 and one clear message, no traceback."""


class UserError(Exception):
    """Bad config or bad input. The message names the key, file, row or option and what is allowed."""


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
