"""The one exception type users see: a message that says what is wrong and how to fix it."""


class PilotError(Exception):
    """Bad input (config, data, weights, resume). The CLI prints it without a traceback."""
