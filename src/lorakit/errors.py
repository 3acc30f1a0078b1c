"""The one error hierarchy of lorakit.

Every error raised for bad input derives from :class:`LoraError` (itself a ``ValueError``, so code written for
diffusers' ``ValueError`` keeps working). A message names the file or key, says what was expected and what was
found, and how to fix it. lorakit checks everything before changing anything, so after any ``LoraError`` the model
is exactly as it was.
"""

from __future__ import annotations


class LoraError(ValueError):
    """Base class of every error lorakit raises for bad input."""


class LoraFileError(LoraError):
    """A LoRA source could not be found, read or parsed (missing path, truncated file, corrupt header, pickle)."""


class LoraKeyError(LoraError):
    """Keys of a LoRA file match no module of the model, or are malformed."""


class LoraShapeError(LoraError):
    """A tensor of a LoRA file does not fit the module it targets."""


class AdapterError(LoraError):
    """An adapter name is unknown, duplicated, or used in a way its state does not allow."""


class FusingError(LoraError):
    """Fusing would produce non-finite weights (with ``safe_fusing=True``)."""


def preview(items: list[str] | set[str], limit: int = 8) -> str:
    """Render a few items of a long list for an error message: ``'a', 'b', ... (+12 more)``."""
    items = sorted(items)
    head = ", ".join(repr(i) for i in items[:limit])
    more = len(items) - limit
    return head + (f", ... (+{more} more)" if more > 0 else "")
