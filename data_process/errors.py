"""The two ways bad input leaves the data tools: ``Reject`` drops one row and is counted under its reason;
``SourceError`` stops one dataset with a one-line message (no traceback)."""

from __future__ import annotations

__all__ = ["Reject", "SourceError"]


class Reject(Exception):
    """A row that must be dropped; ``reason`` is the key it is counted under. A reader that parsed the row
    but cannot pass it on keeps it in ``record`` (for its id in the rejects log)."""

    def __init__(self, reason: str, detail: str = "", record: object = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.record = record


class SourceError(Exception):
    """Bad input that stops a dataset (reported as one line, no traceback)."""
