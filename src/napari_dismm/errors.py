"""Domain exceptions: every error a user can cause is one of these, so the CLI and the
viewer can show one clear line instead of a traceback."""


class DismmError(Exception):
    """Base class for errors caused by input the user can fix."""


class SlideError(DismmError, ValueError):
    """A file that is not a readable whole-slide image, or a bad request against one."""


class UnknownMppError(SlideError):
    """The slide's microns-per-pixel are unknown and no override was given."""


class FeatureFileError(DismmError, ValueError):
    """A feature file that is missing, malformed or inconsistent."""


class ModelConfigError(DismmError, ValueError):
    """A model directory or configuration that does not match what is asked of it."""


class DataError(DismmError, ValueError):
    """Cohort, expression or gene-set input that fails validation."""


class DismmWarning(UserWarning):
    """Something was recovered from (e.g. an unreadable tile shown as background)."""
