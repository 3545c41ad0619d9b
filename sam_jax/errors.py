"""Typed errors shared by the library and the commands, and the one-line form of any error.

Commands map them to exit statuses in sam_jax.cli.common (never by matching message text).
"""

from __future__ import annotations


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (a string or an exception) on one line; an empty exception gives its type name;
    longer than `limit` characters it is cut with "..."."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class UsageError(Exception):
    """The command line or the config asks for something invalid (commands exit 2)."""


class ConfigError(UsageError, ValueError):
    """A config field has the wrong type or is out of range (the message names the field)."""


class OutputOverlapsInputError(UsageError, ValueError):
    """An output path is, contains (when it would be replaced) or lies inside an input path."""


class NoTextPathError(UsageError, ValueError):
    """A text prompt for a SAM without a text path (SamConfig.text_embed_dim 0)."""


class CheckpointError(ValueError):
    """A checkpoint is damaged, incomplete or unreadable, or holds params that are refused
    (non-finite values); the message is one line naming the checkpoint and the file or array."""


class PathError(OSError):
    """A path cannot be used; the message is one line naming the path and the reason."""


class NoMasksError(ValueError):
    """An evaluation found no mask to evaluate (no readable image with a non-empty mask)."""


class RequestError(Exception):
    """A request the annotation tool refuses: HTTP `status` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


class StaleIndexError(ValueError):
    """A cache file of another tar version (the tar changed since it was indexed)."""


class DistributedError(RuntimeError):
    """The job has several processes but they could not be joined (or disagree)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the update) became NaN or infinite."""


class WorkdirMismatchError(ValueError):
    """The workdir holds a checkpoint of another experiment (model or train state)."""


def check_bool(name: str, value: object) -> bool:
    """`value` if it is a bool (or numpy bool); TypeError otherwise (the string "False" is true
    by truthiness, so flags are never read that way)."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


class TopologyError(UsageError, ValueError):
    """The TPU topology name is not one sam_jax knows (v4, v5e, v5p, v6e with a shape)."""


class LibtpuMissingError(ImportError):
    """libtpu, the TPU compiler, is not installed."""


class PlanDoesNotFitError(RuntimeError):
    """The program needs more HBM per chip than the chip has (less the headroom)."""
