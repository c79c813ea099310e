"""Errors raised by the retrieval package; each message states what was expected."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for every error the retrieval package raises on purpose."""


class UploadRejected(RetrievalError):
    """The bytes given are not a file we accept; `code` names the reason for the web app."""

    code = "invalid_upload"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ImageRejected(UploadRejected):
    """The bytes given are not an image we accept; `code` names the reason."""

    code = "invalid_image"


class UnsupportedFormat(ImageRejected):
    """The bytes decode as something other than an accepted image format."""

    code = "unsupported_format"


class CorruptImage(ImageRejected):
    """The bytes claim an accepted format but do not decode completely."""

    code = "corrupt_image"


class ImageTooLarge(ImageRejected):
    """The image has more pixels than allowed (a decompression bomb, or just too big)."""

    code = "image_too_large"


class UnknownBackbone(RetrievalError, KeyError):
    """No backbone is registered under the name asked for."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class WeightsNotFound(RetrievalError, FileNotFoundError):
    """A backbone's weights file is absent; weights are never downloaded."""
