"""Data access: image readers, manifests and dataset preparation."""
