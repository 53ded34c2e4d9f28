"""One exception type for mistakes the user can fix; the CLI prints it as a single line."""

import difflib


class UserError(Exception):
    """An error caused by the user's input. Its message says what to do next."""


def closest(word: str, choices) -> str:
    """A ' Did you mean X?' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.4)
    return f" Did you mean '{match[0]}'?" if match else ""
