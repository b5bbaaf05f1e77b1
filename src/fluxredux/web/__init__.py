"""The web playground: static files served by the API, talking only to the public API."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
