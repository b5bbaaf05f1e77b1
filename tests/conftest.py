"""Shared fixtures, the one backend fixture of the contract suites, and the integration
marker.

The model fixtures use the demo model: tiny random weights written to disk in the real
diffusers layout and loaded back through the real loader. Its images are noise; the
tests check sizes, formats, determinism and control flow, never what the images show.

``engine`` (see tests/backends.py) is parametrised over the engines of the module's
``SEAM``; the cases on an engine that needs a server of the session's (redis, s3) are
integration tests.

``integration``: a test that starts a process or a server (a ``fluxredux serve`` or worker
subprocess, any subprocess, redis-server, the moto S3 server, chromium, a uvicorn or
http.server server). Marked here, at collection, from what the test and its fixtures use
(see ``starts_something``), so that ``pytest -m "not integration"`` is the quick loop.
"""

from __future__ import annotations

import builtins
import contextlib
import dis
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FunctionType, ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from tests.helpers import FakeClock

if TYPE_CHECKING:
    from playwright.sync_api import Browser

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
    from fluxredux.pipeline.loading import load_model

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
    point_aws_at(monkeypatch, s3_endpoint, nothing)
    return s3_endpoint


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- the one backend fixture -------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``engine``: one case per engine of the module's ``SEAM`` (or those a test's
    ``@pytest.mark.engines(...)`` names), the served ones marked integration."""
    if "engine" not in metafunc.fixturenames:
        return
    from tests.backends import SERVED, engines_of

    names = engines_of(metafunc.module.SEAM)
    narrowed = metafunc.definition.get_closest_marker("engines")
    if narrowed is not None:
        unknown = set(narrowed.args) - set(names)
        assert not unknown, f"{metafunc.module.SEAM} has no engine {sorted(unknown)}: {names}"
        names = [name for name in names if name in narrowed.args]
    cases = [
        pytest.param(name, id=name, marks=[pytest.mark.integration] if name in SERVED else [])
        for name in names
    ]
    metafunc.parametrize("engine", cases, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    """The module's seam on one engine, for this test alone (see tests/backends.py)."""
    from tests.backends import Engine

    made = Engine(request.param, request.module.SEAM, request, tmp_path, clock)
    yield made
    made.close()


# --- the integration marker --------------------------------------------------------------

# What starts a process or a server, by dotted name (a module, or anything defined in it).
STARTERS = (
    "subprocess",
    "multiprocessing",
    "asyncio.subprocess",
    "os.fork",
    "os.system",
    "os.posix_spawn",
    "uvicorn",
    "http.server",
    "socketserver",
    "playwright",
    "fluxredux.worker.supervisor.WorkerSupervisor",
    # Fixtures that start processes out of sight of the names they use: torch.compile's
    # inductor builds its kernels with g++ in a pool of compile worker processes.
    "tests.test_compile.compiled",
)


def _dotted(thing: object) -> str:
    if isinstance(thing, ModuleType):
        return thing.__name__
    module, name = getattr(thing, "__module__", None), getattr(thing, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""


def _is_starter(dotted: str) -> bool:
    return any(dotted == starter or dotted.startswith(starter + ".") for starter in STARTERS)


def _ours(thing: object) -> bool:
    """Defined in the tests package: its code is looked into too."""
    module = getattr(thing, "__module__", None)
    return isinstance(module, str) and (module == "tests" or module.startswith("tests."))


def _named(code: CodeType, namespace: dict[str, Any]) -> Iterator[object | str]:
    """What ``code`` (and the functions and lambdas in it) names: its globals, what it
    imports and the attributes read from those (``subprocess.Popen``,
    ``http.server.ThreadingHTTPServer``); a dotted name where the module is not loaded
    (nothing is imported here but the tests' own modules)."""
    current: object = None
    module_name = ""
    for instruction in dis.get_instructions(code):
        op, name = instruction.opname, instruction.argval
        if op in ("LOAD_GLOBAL", "LOAD_NAME"):
            current = namespace.get(name, getattr(builtins, str(name), None))
        elif op == "IMPORT_NAME":
            module_name = str(name)
            if module_name == "tests" or module_name.startswith("tests."):
                with contextlib.suppress(ImportError):  # then the test itself says why
                    importlib.import_module(module_name)
            current = sys.modules.get(module_name, module_name)
        elif op == "IMPORT_FROM":
            module = sys.modules.get(module_name)
            found = getattr(module, str(name), None) if module is not None else None
            yield found if found is not None else f"{module_name}.{name}"
            continue
        elif op in ("LOAD_ATTR", "LOAD_METHOD") and isinstance(current, str | ModuleType):
            # From a module's namespace only (never a lazy module __getattr__ that imports).
            dotted = f"{_dotted(current) if isinstance(current, ModuleType) else current}.{name}"
            current = vars(current).get(str(name), dotted) if isinstance(current, ModuleType) else dotted
        else:
            current = None
            continue
        if current is not None:
            yield current
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _named(constant, namespace)


def _functions_of(thing: object) -> Iterator[FunctionType]:
    """A function (unwrapped: a @contextmanager's own code), or a class's methods."""
    members = vars(thing).values() if isinstance(thing, type) else [thing]
    for member in members:
        member = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
        if isinstance(member, FunctionType):
            yield inspect.unwrap(member)


# Each function's verdict, found once for the session (False while it is being found: a
# cycle of helpers adds nothing).
_VERDICTS: dict[FunctionType, bool] = {}


def _starts(function: FunctionType) -> bool:
    if function not in _VERDICTS:
        _VERDICTS[function] = False
        _VERDICTS[function] = any(
            _is_starter(named)
            if isinstance(named, str)
            else _is_starter(_dotted(named)) or (_ours(named) and starts_something(named))
            for named in _named(function.__code__, function.__globals__)
        )
    return _VERDICTS[function]


def starts_something(thing: object) -> bool:
    """Whether ``thing`` (a function or class of the tests), or a helper of the tests it
    names, in any depth, names something that starts a process or a server."""
    return any(_starts(function) for function in _functions_of(thing))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``integration`` on every test that, or one of whose fixtures (of the tests package),
    starts a process or a server."""
    for item in items:
        if item.get_closest_marker("integration") is not None or not isinstance(item, pytest.Function):
            continue
        fixtures = [
            definition.func
            for definitions in item._fixtureinfo.name2fixturedefs.values()
            for definition in definitions
            if _ours(definition.func)
        ]
        functions = [item.function, *fixtures]
        if any(_is_starter(_dotted(function)) or starts_something(function) for function in functions):
            item.add_marker(pytest.mark.integration)


def point_aws_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, nothing: Path) -> None:
    """The standard AWS variables pointed at ``endpoint`` with dummy credentials; ``nothing``
    (a path that does not exist) stands in for the machine's config and credentials files."""
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(nothing),
        "AWS_SHARED_CREDENTIALS_FILE": str(nothing),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


# --- the browser of the browser tests (test_web.py, test_docs_browser.py) ---------------

CHROMIUM = "/usr/bin/chromium"  # Debian's: never a downloaded browser
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium per test module, driven by Playwright (imported here only when used)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        "Debian chromium is missing: scripts/test installs it (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
