"""Errors matfit raises for the user: each says what went wrong and what to do."""
from __future__ import annotations


class MatfitError(Exception):
    """Base class: a problem the user can act on. The CLI prints it without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  -> {hint}")


class RuntimeSetupError(MatfitError):
    """The rendering runtime (LLVM, CUDA, Mitsuba variant) is unusable."""

    exit_code = 3


class ImageLoadError(MatfitError):
    """A reference image cannot be used."""


class LibraryError(MatfitError):
    """A material folder is malformed or a material is unknown."""


class RecipeError(MatfitError):
    """A recipe file is unreadable, of another schema version, or has invalid values."""


class BackboneError(MatfitError):
    """A descriptor backbone is missing, or descriptors of different backbones were mixed."""


class Cancelled(MatfitError):
    """A long job was cancelled by the user; nothing half-written was left behind."""

    exit_code = 130
