"""The one exception the converter raises for bad input."""


class ConvertError(ValueError):
    """An input the converter cannot or will not convert; the message names the problem.

    A subclass of ValueError so that callers who do not know this package still catch it;
    the CLI prints the message and exits 1.
    """
