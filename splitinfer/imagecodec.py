"""Image codecs for the cloud-only baseline's input (placeholder; filled in by issue 9)."""

from __future__ import annotations

__all__ = ["ImageCodec"]


class ImageCodec:
    """Placeholder so that the wire and the manifest can name the type."""
