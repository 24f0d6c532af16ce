"""The one exception type users see: a single line naming what was wrong, where, and what to do."""

from __future__ import annotations


class VlmHpcError(Exception):
    """A problem with the user's input (files, config, data); printed as one line, never a traceback."""


class ImageRejected(VlmHpcError):
    """An image that cannot be captioned; `reason` is a short machine-readable tag for the failure ledger."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
