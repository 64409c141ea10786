"""The exception for mistakes a user can make; the CLI turns it into one line and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (flag, file, data) that they can fix; never a bug of ours."""
