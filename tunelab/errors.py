"""The one exception type for a user's mistake: the CLI prints it as one line and exits non-zero."""


class TunelabError(Exception):
    """A problem with the user's input (file, config key, model path) that they can fix.

    The message must name the file and line, or the key, and say what to do.
    """


def where(path, line: int | None = None) -> str:
    """'file:line' for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
