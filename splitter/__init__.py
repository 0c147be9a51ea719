"""splitter."""
