"""The worker's conditioning cache: an LRU bounded by bytes, exact (a hit gives the bytes a
miss gives), skipping the image encoder for a repeated reference, and its counters on
/metrics through the worker registry. On the demo model (tiny random weights)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from fluxredux.config import Settings
from fluxredux.jobs.registry import WorkerInfo, process_space, this_host
from fluxredux.pipeline.conditioning import redux_conditioning
from fluxredux.pipeline.conditioning_cache import (
    MIB,
    ConditioningCache,
    cached_redux_conditioning,
    entry_bytes,
    pixels_key,
)
from fluxredux.pipeline.fake import FakeModel
from fluxredux.pipeline.loading import load_model
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.text_encoders import LazyTextEncoders
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor
from fluxredux.worker.process import WorkerProcess, model_details
from fluxredux.worker.registration import Registration
from tests.harness import running_server
from tests.test_registry import ended_pid


class CountingEncoder(torch.nn.Module):
    """The image encoder, counting its runs (handed to the model's constructor)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, **inputs: Any) -> Any:
        self.calls += 1
        return self.inner(**inputs)


def sharing(
    demo_model: ReduxModel,
    text_encoders: LazyTextEncoders | None = None,
    *,
    cache: ConditioningCache | None = None,
    encoder: torch.nn.Module | None = None,
) -> ReduxModel:
    """The demo model's components (weights shared), with a cache, text encoders or an
    image encoder of the test's own."""
    parts = demo_model.parts if encoder is None else replace(demo_model.parts, image_encoder=encoder)
    return ReduxModel(
        parts,
        demo_model.info,
        conditioning_cache=cache,
        text_encoders=text_encoders,
    )


def predict(model: ReduxModel, image: Image.Image, **fields: Any) -> PredictionResult:
    settings = {"megapixels": "0.25", "output_format": "png", "seed": 7, **fields}
    inputs = PredictionInput(redux_image="data:,x", disable_safety_checker=True, **settings)
    return Predictor(model, safety=None).predict(inputs, [image])


def tokens(floats: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((floats,), value, dtype=torch.float32)  # 4 bytes each


def test_the_least_recently_used_go_first_when_the_bytes_run_out() -> None:
    cache = ConditioningCache(max_bytes=1200)
    for key in (b"a", b"b", b"c"):
        cache.put(key, tokens(100))  # 400 bytes each: full
    assert (len(cache), cache.bytes) == (3, 1200)
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", tokens(100))
    assert [key in cache for key in (b"a", b"b", b"c", b"d")] == [True, False, True, True]
    cache.put(b"e", tokens(200))  # 800 bytes: c and a, the least recently used, make room
    assert [key in cache for key in (b"a", b"c", b"d", b"e")] == [False, False, True, True]
    assert cache.bytes == 1200
    cache.put(b"e", tokens(50, 1.0))  # replacing an entry counts its bytes once
    assert (cache.bytes, float(cache.get(b"e")[0])) == (600, 1.0)  # type: ignore[index]
    cache.put(b"huge", tokens(301))  # larger than the whole bound: not kept, nothing evicted
    assert b"huge" not in cache and cache.bytes == 600
    assert cache.get(b"b") is None
    assert cache.counters() == {"hits": 2, "misses": 1}


def test_an_entry_counts_the_whole_storage_it_keeps_alive() -> None:
    whole = torch.zeros(1000)
    assert entry_bytes(whole[:10]) == 4000


def test_a_bound_of_zero_turns_the_cache_off(
    model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, demo_model: ReduxModel
) -> None:
    assert ConditioningCache.from_megabytes(0) is None
    nothing = ConditioningCache(0)
    nothing.put(b"a", tokens(1))
    assert len(nothing) == 0 and nothing.get(b"a") is None
    monkeypatch.setenv("FLUXREDUX_CONDITIONING_CACHE_MB", "0")
    off = load_model(Settings(model="demo", cache_dir=model_cache_dir))
    assert off.conditioning_cache is None
    assert "conditioning_cache" not in model_details(off)  # no cache, no counters
    # The default: 256 MiB.
    assert demo_model.conditioning_cache is not None and demo_model.conditioning_cache.max_bytes == 256 * MIB


def test_the_cached_conditioning_equals_redux_conditioning_bit_for_bit(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    parts, device = demo_model.parts, demo_model.device
    config = parts.pipe.transformer.config
    expected = redux_conditioning(
        reference_image, image_encoder=parts.image_encoder, feature_extractor=parts.feature_extractor,
        image_embedder=parts.image_embedder, joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim, device=device,
    )  # fmt: skip
    cache = ConditioningCache(MIB)
    miss = cached_redux_conditioning(reference_image, parts, cache=cache, device=device)
    hit = cached_redux_conditioning(reference_image, parts, cache=cache, device=device)
    assert cache.counters() == {"hits": 1, "misses": 1}
    for got in (miss, hit):
        assert torch.equal(got.prompt_embeds, expected.prompt_embeds)
        assert torch.equal(got.pooled_prompt_embeds, expected.pooled_prompt_embeds)
    # What downstream does to a conditioning never reaches the cached tokens.
    hit.prompt_embeds.mul_(0)
    again = cached_redux_conditioning(reference_image, parts, cache=cache, device=device)
    assert torch.equal(again.prompt_embeds, expected.prompt_embeds)


def test_a_hit_gives_the_same_bytes_as_a_miss(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    encoder = CountingEncoder(demo_model.parts.image_encoder)
    cache = ConditioningCache(MIB)
    model = sharing(demo_model, cache=cache, encoder=encoder)
    miss = predict(model, reference_image, num_outputs=2)
    hit = predict(model, reference_image, num_outputs=2)
    uncached = predict(sharing(demo_model), reference_image, num_outputs=2)
    assert (encoder.calls, cache.counters()) == (1, {"hits": 1, "misses": 1})
    files = [[o.data for o in result.outputs] for result in (miss, hit, uncached)]
    assert files[0] == files[1] == files[2]
    assert hit.timings["prior"] > 0


def test_a_repeated_reference_skips_the_image_encoder(demo_model: ReduxModel) -> None:
    encoder = CountingEncoder(demo_model.parts.image_encoder)
    entry = 16 * 32 * 4  # the demo's Redux tokens: 16 of width 32, fp32
    model = sharing(demo_model, cache=ConditioningCache(2 * entry), encoder=encoder)
    portrait = Image.new("RGB", (48, 96), (200, 30, 30))
    portrait.paste((20, 40, 220), (0, 0, 48, 24))
    other = Image.new("RGB", (64, 64), (10, 200, 10))

    predict(model, portrait, redux_image_crop="center")
    predict(model, portrait, redux_image_crop="center", seed=8, num_inference_steps=1)
    assert encoder.calls == 1  # the same reference, whatever else changes
    predict(model, portrait, redux_image_crop="pad")
    assert encoder.calls == 2  # another crop: other pixels for the encoder, another entry
    predict(model, portrait.copy(), redux_image_crop="center")
    assert encoder.calls == 2  # the key is the content, not the object
    predict(model, other)
    assert encoder.calls == 3  # full: "pad", the least recently used, made room
    predict(model, portrait, redux_image_crop="center")
    assert encoder.calls == 3
    predict(model, portrait, redux_image_crop="pad")
    assert encoder.calls == 4
    assert model.conditioning_cache is not None
    assert model.conditioning_cache.counters() == {"hits": 3, "misses": 4}


def test_the_key_is_the_pixels_the_encoder_gets(demo_model: ReduxModel) -> None:
    def key(image: Image.Image) -> bytes:
        pixels = demo_model.parts.feature_extractor.preprocess(images=image, return_tensors="pt").pixel_values
        return pixels_key(pixels)

    image = Image.new("RGB", (64, 64), (1, 2, 3))
    changed = image.copy()
    changed.paste((1, 2, 200), (60, 60, 64, 64))
    assert key(image) == key(image.copy()) != key(changed)
    assert key(image) == key(Image.new("RGB", (96, 96), (1, 2, 3)))  # resized to the same pixels


def wait_for(check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def test_hits_and_misses_reach_metrics_through_the_registry(
    tmp_path: Path, demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    model = sharing(demo_model, cache=ConditioningCache(MIB))
    with running_server(tmp_path, run_worker=False) as api:
        registry = api.services.registry
        # Another machine's worker, and one whose process has ended on this one (gone).
        remote = {"process_space": "elsewhere", "conditioning_cache": {"hits": 5, "misses": 2}}
        registry.register(WorkerInfo("gpu-box-2", "gpu-box", 99, "flux", "cuda", "ready", 1, details=remote))
        here = {"process_space": process_space(), "conditioning_cache": {"hits": 9, "misses": 9}}
        registry.register(
            WorkerInfo("dead", this_host(), ended_pid(), "flux", "cpu", "ready", 1, details=here)
        )
        # A worker on the demo model, reporting as a worker process does (see WorkerProcess.run).
        registration = Registration(registry, "demo-worker", model="demo", device="cpu", every=0.1)
        registration.start()
        registration.update("ready", **model_details(model))
        registration.report_on_beat(lambda: model_details(model))
        fake = Registration(registry, "fake-worker", model="fake", device="cpu", every=0.1)
        fake.start()
        fake.update("ready", **model_details(FakeModel()))
        try:
            for image in (reference_image, reference_image, reference_image, Image.new("RGB", (32, 32))):
                predict(model, image)

            def scrape() -> str | None:
                text = httpx.get(api.url + "/metrics").text
                done = 'fluxredux_conditioning_cache_hits_total{worker="demo-worker"} 2.0' in text
                return text if done else None

            metrics = wait_for(scrape)
        finally:
            registration.stop()
            fake.stop()
    assert "# TYPE fluxredux_conditioning_cache_hits_total counter" in metrics
    assert 'fluxredux_conditioning_cache_misses_total{worker="demo-worker"} 2.0' in metrics
    assert 'fluxredux_conditioning_cache_hits_total{worker="gpu-box-2"} 5.0' in metrics
    assert 'fluxredux_conditioning_cache_misses_total{worker="gpu-box-2"} 2.0' in metrics
    assert 'worker="dead"' not in metrics and 'worker="fake-worker"' not in metrics


class CountingRegistry:
    """A registry's writes, counted (wrapping a real one)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.registers = 0
        self.heartbeats = 0

    def register(self, worker: WorkerInfo) -> None:
        self.registers += 1
        self.inner.register(worker)

    def heartbeat(self, worker_id: str, **changes: Any) -> bool:
        self.heartbeats += 1
        return bool(self.inner.heartbeat(worker_id, **changes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_counters_ride_on_heartbeats_only_when_they_changed() -> None:
    from fluxredux.backends.memory.registry import MemoryWorkerRegistry

    registry = CountingRegistry(MemoryWorkerRegistry())
    counts = {"hits": 0, "misses": 0}
    registration = Registration(registry, "w", model="demo", device="cpu", every=60)  # type: ignore[arg-type]
    registration.start()
    registration.report_on_beat(lambda: {"conditioning_cache": dict(counts)})
    try:
        registration._refresh()  # a beat (the thread's first is a minute away)
        registration._refresh()
        assert (registry.registers, registry.heartbeats) == (2, 1)  # start, the first report, a beat
        counts["hits"] += 3
        registration._refresh()
        assert (registry.registers, registry.heartbeats) == (3, 1)  # the write replaced the beat
        [entry] = registry.workers()
        assert entry.details["conditioning_cache"] == {"hits": 3, "misses": 0}
    finally:
        registration.stop()


def test_the_worker_process_reports_its_cache_when_ready(tmp_path: Path, demo_model: ReduxModel) -> None:
    settings = Settings(data_dir=tmp_path, model="demo", heartbeat_seconds=0.2)
    model = sharing(demo_model, cache=ConditioningCache(MIB))
    for factory, expected in ((lambda _: model, {"hits": 0, "misses": 0}), (lambda _: FakeModel(), None)):
        process = WorkerProcess(settings, worker_id="w", model_factory=factory)
        thread = threading.Thread(target=process.run, daemon=True)
        thread.start()
        try:
            registry = process.backends.registry
            [entry] = wait_for(lambda r=registry: [w for w in r.workers() if w.state == "ready"])
            assert entry.details.get("conditioning_cache") == expected
            wait_for(lambda p=process: p._worker is not None)  # past loading: a stop now drains
        finally:
            process.request_stop()
            thread.join(10)
