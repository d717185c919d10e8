"""The one exception type for mistakes a user can fix (bad config, missing file, wrong name)."""


class KdtoolError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero.

    Bugs inside kdtool are never wrapped in this class, so they keep their tracebacks.
    """
