"""cloud_service."""
