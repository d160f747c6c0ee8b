"""Errors that mean "the user's input is wrong": the CLI prints them as one line, no traceback."""


class UserInputError(ValueError):
    """A bad config value, prompt file, model path or reward name; the message says what to change."""
