"""Errors a user can cause: the CLI prints their one sentence and exits non-zero.

The class lives in the methods package (which needs only torch) so that a wrong method setting
and a wrong flag are the same kind of error for the command line."""
from olmbalance.errors import UserError  # noqa: F401
