"""The error a user can cause (a bad setting, a model a method cannot train): one sentence."""


class UserError(Exception):
    """A mistake in a flag, a setting or an input; the message is one sentence naming it."""
