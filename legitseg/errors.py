"""The few error types legitseg raises; each carries the exit code of SPEC section 6."""

from __future__ import annotations

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_RUNTIME = 4
EXIT_LOCKED = 5
EXIT_NO_IMAGES = 6  # --require-images and an INPUT held no images
EXIT_VERIFY_FAILED = 7  # legitseg verify: a case did not hold
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGPIPE = 141  # --jsonl reader closed stdout, as a shell reports SIGPIPE


class LegitsegError(Exception):
    """Base class: a message for the user and the exit code it maps to."""

    exit_code = EXIT_RUNTIME


class UsageError(LegitsegError):
    """Bad command-line arguments or combinations (exit 2)."""

    exit_code = EXIT_USAGE


class ManifestError(LegitsegError):
    """models.yaml is missing, malformed or refers to something invalid (exit 3)."""

    exit_code = EXIT_INTEGRITY


class WeightsError(LegitsegError):
    """A weights file fails its sha256, cannot be loaded safely, or does not fit (exit 3)."""

    exit_code = EXIT_INTEGRITY


class RuntimeFailure(LegitsegError):
    """Device, memory or output-folder failure that stops the run (exit 4)."""

    exit_code = EXIT_RUNTIME


class OutputLocked(LegitsegError):
    """Another legitseg run holds the output folder (exit 5)."""

    exit_code = EXIT_LOCKED


class NoImages(LegitsegError):
    """--require-images and an INPUT folder held no images (exit 6)."""

    exit_code = EXIT_NO_IMAGES


class ImageError(Exception):
    """One image cannot be processed; recorded as `failed`, the run goes on.

    `sha256` is the hash of the file's bytes when they could be read, so the record
    of a bad file still identifies its content.
    """

    def __init__(self, message: str, *, sha256: str | None = None):
        super().__init__(message)
        self.sha256 = sha256


class VerificationPackageError(LegitsegError):
    """A verification package is missing, malformed or altered (exit 3)."""

    exit_code = EXIT_INTEGRITY


class NothingToScore(LegitsegError):
    """Nothing to score or process: evaluate found ground truth but scored no pair (exit 6)."""

    exit_code = EXIT_NO_IMAGES


EXIT_NO_ADEQUATE = 8  # --require-adequate (or the quality policy's require_adequate) and no adequate image


class NoAdequateImage(LegitsegError):
    """The run asked for at least one adequate image (docs/quality.md) and got none (exit 8)."""

    exit_code = EXIT_NO_ADEQUATE
