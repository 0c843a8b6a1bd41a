"""The one error type the weights story lets escape."""


class WeightsError(RuntimeError):
    """Weights that could not be had. The message says what to do and holds no secret: coglet
    shows the class name and the message to the user as they are."""
