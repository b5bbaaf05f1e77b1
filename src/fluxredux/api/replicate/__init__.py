"""The Replicate-compatible surface: its routes, response shapes and renderer."""
