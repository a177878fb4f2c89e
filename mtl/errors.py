"""The one exception type users see for bad input.

Every error caused by the user's input (a file, a name, a config key, a checkpoint) is an
`MtlError` whose message names the offending file, line or key. The CLI prints the message
alone, without a traceback; library callers can catch it like any exception.
"""


class MtlError(Exception):
    """Bad input: a malformed file, an unknown name, a checkpoint that does not fit."""
