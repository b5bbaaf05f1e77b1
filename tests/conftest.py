"""Shared fixtures.

The model fixtures use the demo model: tiny random weights written to disk in the real
diffusers layout and loaded back through the real loader. Its images are noise; the
tests check sizes, formats, determinism and control flow, never what the images show.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO / "examples" / "sample.jpg"


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the demo model, written once per test session."""
    from fluxredux.pipeline.demo import ensure_demo_model

    cache = tmp_path_factory.mktemp("fluxredux-cache")
    ensure_demo_model(cache)
    return cache


@pytest.fixture(scope="session")
def demo_model(model_cache_dir: Path) -> Any:
    """The demo model loaded through the real loader (load_model with settings)."""
    from fluxredux.config import Settings
    from fluxredux.pipeline.redux_model import load_model

    return load_model(Settings(model="demo", cache_dir=model_cache_dir))


@pytest.fixture(scope="session")
def reference_image() -> Image.Image:
    from fluxredux.images import DecodeLimits, decode_image

    return decode_image(SAMPLE_IMAGE.read_bytes(), DecodeLimits())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the session (tests keep apart by key prefix)."""
    from tests.services import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing the server never see each other."""
    import secrets

    return f"test-{secrets.token_hex(4)}:"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto S3 server for the session (tests keep apart by bucket); its endpoint URL."""
    from tests.services import s3_server

    with s3_server() as url:
        yield url


@pytest.fixture
def s3_env(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The standard AWS variables pointed at the test S3 server (dummy credentials), for this
    test only; no profile or config file of the machine's can take part. Its endpoint URL."""
    nothing = tmp_path_factory.mktemp("no-aws-config") / "none"
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(nothing),
        "AWS_SHARED_CREDENTIALS_FILE": str(nothing),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint
