"""The errors a user can act on. The `cli` wrapper (core/config.py) turns them into one line and an exit code:
2 for bad input (fix it), 3 for an outage (re-run the same command once the engine is back)."""


class ConfigError(ValueError):
    """Bad user input (a recipe, an override, a file, a row): the message names it and says what was expected."""


class OutageError(RuntimeError):
    """An engine or judge did not answer (connection refused, timeout, HTTP 5xx or 429 after retries, authentication,
    a rejected request). What it would have produced is missing, never a result: nothing is written for it, and
    re-running the same command redoes only what is missing."""

    def __init__(self, message: str, completions: list | None = None):
        super().__init__(message)
        # from one engine call: what did come back, None where a request failed
        self.completions = completions


class EngineError(RuntimeError):
    """An engine that cannot start (a missing model, an unset API key variable, no server URL): a user error.
    A request that fails once the engine runs is an `OutageError` instead."""


def first_line(e: Exception) -> str:
    """omegaconf's messages go on with `full_key: ...` lines; a command's error is one line."""
    return str(e).partition("\n")[0]
