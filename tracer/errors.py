"""The one exception for user mistakes.

Everything a user can get wrong (a bad sequence, a missing checkpoint, a file that is not a
trace, an option the machine cannot honour) raises :class:`TracerError` with a message that
names what was wrong and, where it helps, what was available. The command-line entry points
catch it, print ``tracer: error: <message>`` on one line and exit with status 2. Anything else
is a bug in tracer and keeps its traceback.
"""


class TracerError(Exception):
    """A user-facing error: one line, no traceback, non-zero exit."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none): what
    a one-line error quotes of a library's exception."""
    text = [t.strip() for t in str(e).splitlines() if t.strip()]
    return text[0] if text else type(e).__name__
