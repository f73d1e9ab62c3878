"""zoo's error types.

Every error zoo raises about something it was given (a model name, a checkpoint or image file, a data folder, a recipe,
an output folder) is a :class:`ZooError` whose message names what is wrong and what to do; the ``zoo`` command prints
it as one line. Any other exception that escapes zoo is a bug in zoo, and the command shows its traceback. Each type
is also the built-in exception it refines (``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""

__all__ = ['ImageFileError', 'ManifestError', 'ModelNameError', 'UsageError', 'WeightsUnavailableError', 'ZooError']


class ZooError(Exception):
    """Something given to zoo cannot be used; the message says what and what to do."""


class ModelNameError(ZooError, ValueError):
    """A model name or tag that no registry knows."""


class WeightsUnavailableError(ZooError, RuntimeError):
    """Pretrained weights zoo cannot fetch by itself: none are published, or not where timm downloads from."""


class ImageFileError(ZooError, ValueError):
    """A path that is not a readable image file."""


class UsageError(ZooError, ValueError):
    """Options or arguments that do not go together."""


class ManifestError(ZooError, ValueError):
    """A weights manifest that is malformed, or an entry of it that cannot be updated."""
