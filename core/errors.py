"""The errors a user can fix. The `cli` wrapper (core/config.py) turns them into one line and exit code 2."""


class ConfigError(ValueError):
    """Bad user input (a recipe, an override, a file, a row): the message names it and says what was expected."""
