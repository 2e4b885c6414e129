"""Exit statuses and the exception family that maps onto them, in one place.

Every command, Slurm task and batch executor ends with one of these statuses (the README's
table).  A stage or a file edge that cannot go on raises one of the exceptions below; the
command line (:func:`pipeline.cli.main`) and the quadrant runner turn it into its status
with :func:`exit_status_of`, so no caller writes "log, return 3" by hand.

- :class:`BadInputError` (3): the input breaks the contract; the message names the file
  or parameter and what is wrong.
- :class:`UnusableImageError` (4): the input is readable but the image cannot be used
  (astrometry or subtraction judged it so); the reason is recorded.
- :class:`RetryableError` (75, ``EX_TEMPFAIL``): the environment failed (SCAMP timed out,
  the broker did not acknowledge, a lock was held too long); running again may help.
- :class:`UsageError` (2): bad usage or configuration.
- any other :class:`PipelineError` (1): a failure inside the pipeline.

The module-specific errors (``ImageContractError``, ``CatalogError``, ``ReferenceError``
...) subclass these, and stay ``ValueError``/``RuntimeError`` where they were, so existing
handlers keep working.
"""
from __future__ import annotations

EXIT_OK = 0          # success; for a quadrant: processed and usable
EXIT_FAILED = 1      # failure inside the pipeline or its environment
EXIT_USAGE = 2       # bad usage or configuration
EXIT_BAD_INPUT = 3   # the input breaks the contract (the message names file and problem)
EXIT_UNUSABLE = 4    # the image is unusable (reasons in the QA record)
EXIT_RETRY = 75      # temporary failure: a retry may help (EX_TEMPFAIL)

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_BAD_INPUT", "EXIT_UNUSABLE", "EXIT_RETRY",
           "PipelineError", "BadInputError", "UnusableImageError", "RetryableError", "UsageError",
           "exit_status_of", "describe"]


class PipelineError(Exception):
    """A failure the pipeline recognises; ``exit_status`` says how a process ends on it."""

    exit_status = EXIT_FAILED
    kind = "failure"


class BadInputError(PipelineError, ValueError):
    """The input breaks the contract (exit 3); the message names the file and the problem."""

    exit_status = EXIT_BAD_INPUT
    kind = "bad input"


class UnusableImageError(PipelineError):
    """A readable image that cannot be used (exit 4); the message gives the reason."""

    exit_status = EXIT_UNUSABLE
    kind = "unusable"


class RetryableError(PipelineError, RuntimeError):
    """The environment failed; a retry may help (exit 75)."""

    exit_status = EXIT_RETRY
    kind = "retry may help"


class UsageError(PipelineError, ValueError):
    """Bad usage or configuration (exit 2)."""

    exit_status = EXIT_USAGE
    kind = "configuration"


def exit_status_of(exc: BaseException) -> int:
    """The exit status a process ends with on ``exc`` (1 for anything unrecognised)."""
    return int(getattr(exc, "exit_status", EXIT_FAILED)) if isinstance(exc, PipelineError) else EXIT_FAILED


def describe(exc: BaseException) -> str:
    """One log line for ``exc``: its kind and message (``bad input: FILE: what is wrong``)."""
    kind = exc.kind if isinstance(exc, PipelineError) else type(exc).__name__
    return f"{kind}: {exc}"
