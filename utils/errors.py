"""Errors a user can cause: the CLI prints their one sentence and exits non-zero."""


class UserError(Exception):
    """A mistake in a flag, path or input file; the message is one sentence naming it."""
