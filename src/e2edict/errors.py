"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class E2EDictError(Exception):
    """Bad user input (config, files, hook names, data): shown as one line, never a traceback."""
