"""The one exception type for input a clinician or operator can fix."""


class InputError(ValueError):
    """The input cannot be processed; the message says what was found and what is expected.

    Messages never contain patient identifiers or uploaded file names.
    """
