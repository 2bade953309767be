"""The one exception type the pipeline raises for bad input: the CLI prints it without a traceback."""


class MediError(Exception):
    """Bad input or configuration. The message names the file, row, key or field and what was expected."""
