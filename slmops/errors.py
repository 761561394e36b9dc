"""The base of errors whose message is the whole story."""


class ExplainedError(RuntimeError):
    """An error whose message says what went wrong and what to do.

    The command line prints it as one line, without a traceback (`flows._runtime`); Prefect's
    API logs, which the UI shows, keep the traceback.
    """


class TransientError(RuntimeError):
    """A failure that a retry may cure (network, a busy store, a corrupted download)."""
