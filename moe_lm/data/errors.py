"""`DataError`: a source file, a row of one, a hub dataset or a prepared folder that moe-lm cannot use.

Its message is one line naming the file (with the line or row where there is one) and what to do, so the
command line prints it as it is, without a traceback. Mistakes in the recipe itself raise `ConfigError`.
"""


class DataError(ValueError):
    """Data that cannot be read or used; the message names the file, line or row."""
