"""The error distclip raises for bad arguments."""


class ArgumentError(ValueError, TypeError):
    """A bad argument: wrong type, bad value, or lists that do not match.

    It subclasses both `ValueError` and `TypeError`, so code that catches
    either (as Keras and TensorFlow callers usually do) catches it. The message
    names the argument and the value it got. Raised while a `tf.function` is
    traced, it surfaces as itself (not as autograph's StagingError).
    """

    ag_pass_through = True


class ContextError(RuntimeError):
    """distclip was called in a distribution context where it cannot work."""

    ag_pass_through = True
