"""Style adapters (LoRA): what a caller may name, what they do to the images, and the
worker's cache of loaded ones.

The model tests run the real loading path (diffusers' PEFT integration) on the demo
model with tiny random LoRAs made by peft for its transformer; the API tests run the
service with the fake model, whose colours an adapter changes as it changes real images.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from fluxredux.config import Settings
from fluxredux.errors import InvalidLora
from fluxredux.loras.catalog import LoraCatalog
from fluxredux.loras.fetch import AdapterFiles
from fluxredux.pipeline.fake import FakeModel
from fluxredux.schema import LoraUse, PredictionInput
from fluxredux.worker.predictor import Predictor
from fluxredux.worker.process import model_details
from tests.harness import Harness, running_server
from tests.helpers import FLUXREDUX
from tests.loras import WIDER, safetensors_of, sdxl_lora, tiny_lora

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(("ink", "moss", "rust"), start=1):
        tiny_lora(folder / f"{name}.safetensors", seed=seed)
    tiny_lora(folder / "wide.safetensors", seed=9, spec=WIDER)  # FLUX's blocks, another width
    return folder


def catalog_of(folder: Path, **limits: int) -> LoraCatalog:
    return LoraCatalog(
        folder, max_rank=limits.get("max_rank", 64), max_bytes=limits.get("max_bytes", 64 * MiB)
    )


def uses(*named: str | tuple[str, float]) -> list[LoraUse]:
    return [LoraUse(name=n) if isinstance(n, str) else LoraUse(name=n[0], scale=n[1]) for n in named]


# --- the catalog: what a caller may name --------------------------------------------------


def refusal(catalog: LoraCatalog, *choices: LoraUse) -> tuple[str, str]:
    with pytest.raises(InvalidLora) as info:
        catalog.check(choices)
    return info.value.code, str(info.value.detail["field"])


def test_the_catalog_lists_usable_adapters_with_rank_and_size_and_says_why_others_are_not(
    tmp_path: Path,
) -> None:
    tiny_lora(tmp_path / "ink.safetensors", seed=1, rank=8)
    sdxl_lora(tmp_path / "sdxl.safetensors")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "pickled.safetensors")  # a pickle, renamed
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")  # not even listed
    entries = {entry.name: entry for entry in catalog_of(tmp_path).entries()}
    assert set(entries) == {"ink", "sdxl", "pickled"}
    assert (entries["ink"].rank, entries["ink"].size) == (8, (tmp_path / "ink.safetensors").stat().st_size)
    assert entries["ink"].problem is None
    assert "not a LoRA of the FLUX.1 transformer" in str(entries["sdxl"].problem)
    assert "not a safetensors file" in str(entries["pickled"].problem)
    assert [entry.name for entry in catalog_of(tmp_path).usable()] == ["ink"]


def test_a_request_naming_an_adapter_it_cannot_use_is_refused_naming_the_field(tmp_path: Path) -> None:
    tiny_lora(tmp_path / "ink.safetensors", seed=1, rank=8)
    sdxl_lora(tmp_path / "sdxl.safetensors")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "pickled.safetensors")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "trained.pt")
    safetensors_of(
        tmp_path / "plain.safetensors", {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}
    )
    catalog = catalog_of(tmp_path)
    catalog.check(uses("ink"))  # a usable one passes
    assert refusal(catalog, *uses("ink", "nowhere")) == ("lora_not_found", "input.loras.1.name")
    assert refusal(catalog, *uses("../ink")) == ("lora_not_found", "input.loras.0.name")
    assert refusal(catalog, *uses("trained.pt")) == ("lora_not_safetensors", "input.loras.0.name")
    assert refusal(catalog, *uses("pickled")) == ("lora_not_safetensors", "input.loras.0.name")
    assert refusal(catalog, *uses("sdxl")) == ("lora_wrong_model", "input.loras.0.name")
    assert refusal(catalog, *uses("plain")) == ("lora_wrong_model", "input.loras.0.name")  # not a LoRA
    assert refusal(catalog, *uses("ink", ("ink.safetensors", 0.5))) == ("lora_twice", "input.loras.1.name")
    assert refusal(catalog_of(tmp_path, max_rank=4), *uses("ink")) == (
        "lora_rank_too_large",
        "input.loras.0.name",
    )
    small = catalog_of(tmp_path, max_bytes=1000)
    assert refusal(small, *uses("ink")) == ("lora_too_large", "input.loras.0.name")


def test_a_hub_adapter_is_refused_unless_the_operator_allows_its_repo(tmp_path: Path) -> None:
    local_only = catalog_of(tmp_path)
    not_allowed = ("lora_source_not_allowed", "input.loras.0.name")
    assert refusal(local_only, *uses("someone/watercolor")) == not_allowed
    settings = Settings(data_dir=tmp_path, lora_sources="hf:studio/*, hf:friend/ink-lora")
    allowed = LoraCatalog.from_settings(settings)
    allowed.check(uses("studio/anything", "studio/watercolor/v2/style.safetensors", "friend/ink-lora"))
    assert refusal(allowed, *uses("friend/other")) == not_allowed
    assert refusal(allowed, *uses("studio/x/weights.bin")) == ("lora_not_found", "input.loras.0.name")
    assert [(e.name, e.source) for e in allowed.entries()] == [
        ("studio/*", "hub"),
        ("friend/ink-lora", "hub"),
    ]
    with pytest.raises(ValueError, match="not hf:owner"):
        Settings(data_dir=tmp_path, lora_sources="https://example.com/x.safetensors")


def test_adding_an_adapter_checks_it_and_copies_it_in(tmp_path: Path) -> None:
    catalog = catalog_of(tmp_path / "loras")
    made = tiny_lora(tmp_path / "downloads" / "Ink Style.safetensors", seed=1)
    with pytest.raises(ValueError, match="not a usable name"):
        catalog.add(made)  # a space: not a name a caller could send
    entry = catalog.add(made, "ink-style")
    assert (entry.name, entry.rank) == ("ink-style", 4)
    assert (tmp_path / "loras" / "ink-style.safetensors").read_bytes() == made.read_bytes()
    with pytest.raises(ValueError, match=r"not a LoRA of the FLUX\.1 transformer"):
        catalog.add(sdxl_lora(tmp_path / "sdxl.safetensors"))
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["ink-style.safetensors"]


def test_the_cli_adds_and_lists_adapters(tmp_path: Path) -> None:
    made = tiny_lora(tmp_path / "ink.safetensors", seed=1, rank=8)
    sdxl = sdxl_lora(tmp_path / "sdxl.safetensors")
    data = ["--data-dir", str(tmp_path / "data")]
    added = subprocess.run([FLUXREDUX, "loras", "add", str(made), *data], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert "added ink (rank 8" in added.stdout
    refused = subprocess.run([FLUXREDUX, "loras", "add", str(sdxl), *data], capture_output=True, text=True)
    assert refused.returncode == 2 and "not a LoRA of the FLUX.1 transformer" in refused.stderr
    listed = subprocess.run([FLUXREDUX, "loras", "list", *data], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    size = (tmp_path / "data" / "loras" / "ink.safetensors").stat().st_size
    assert listed.stdout.splitlines() == [f"ink\tlocal\t8\t{size}\t"]  # piped: tab-separated


# --- the input ---------------------------------------------------------------------------


def test_the_input_takes_up_to_three_adapters_with_scales_from_minus_2_to_2() -> None:
    def fields_of(loras: Any) -> list[str]:
        from pydantic import ValidationError

        from fluxredux.schema import field_errors

        with pytest.raises(ValidationError) as info:
            PredictionInput(redux_image="data:,x", loras=loras)
        return [error.field for error in field_errors(info.value)]

    given = PredictionInput(redux_image="data:,x", loras=[{"name": "ink"}, {"name": "moss", "scale": -2}])
    assert [(lora.name, lora.scale) for lora in given.loras or []] == [("ink", 1.0), ("moss", -2.0)]
    assert PredictionInput(redux_image="data:,x", loras=[]).loras is None  # an emptied form: none
    assert fields_of([{"name": "a"}] * 4) == ["loras"]
    assert fields_of([{"name": "ink", "scale": 2.5}]) == ["loras.0.scale"]
    assert fields_of([{"name": "ink", "scale": True}]) == ["loras.0.scale"]
    assert fields_of([{"name": ""}]) == ["loras.0.name"]
    assert fields_of([{"name": "ink", "url": "https://example.com/x.safetensors"}]) == ["loras.0.url"]


# --- the model: real PEFT adapters on the demo model --------------------------------------


@pytest.fixture(scope="module")
def adapted(model_cache_dir: Path, lora_dir: Path) -> Predictor:
    """The demo model, loaded by the real loader, keeping at most 2 adapters loaded."""
    from fluxredux.pipeline.loading import load_model

    model = load_model(Settings(model="demo", cache_dir=model_cache_dir, lora_cache_count=2))
    return Predictor(model, None, adapters=AdapterFiles(catalog_of(lora_dir)))


def image_of(predictor: Predictor, image: Image.Image, *named: str | tuple[str, float]) -> bytes:
    inputs = PredictionInput(
        redux_image="data:,x",
        disable_safety_checker=True,
        seed=7,
        megapixels="0.25",
        num_inference_steps=2,
        output_format="png",
        loras=uses(*named) or None,
    )
    return predictor.predict(inputs, [image]).outputs[0].data


def counters(predictor: Predictor) -> dict[str, Any]:
    return dict(model_details(predictor.model)["loras"])  # type: ignore[call-overload]


def test_an_adapter_changes_the_images_and_scale_0_or_none_gives_the_same_bytes(
    adapted: Predictor, reference_image: Image.Image
) -> None:
    plain = image_of(adapted, reference_image)
    styled = image_of(adapted, reference_image, "ink")
    assert styled != plain
    assert image_of(adapted, reference_image, ("ink", 0.0)) == plain  # loaded, at scale 0
    assert image_of(adapted, reference_image) == plain  # after an adapter: exactly as before
    assert image_of(adapted, reference_image, ("ink", -1.0)) not in (plain, styled)


def test_two_adapters_mix(adapted: Predictor, reference_image: Image.Image) -> None:
    ink, moss = image_of(adapted, reference_image, "ink"), image_of(adapted, reference_image, "moss")
    both = image_of(adapted, reference_image, "ink", "moss")
    assert len({ink, moss, both}) == 3
    assert image_of(adapted, reference_image, "ink", ("moss", 0.0)) == ink


def test_a_cached_adapter_is_not_loaded_again_and_the_least_recent_goes_first(
    adapted: Predictor, reference_image: Image.Image
) -> None:
    first = image_of(adapted, reference_image, "rust")
    before = counters(adapted)
    assert image_of(adapted, reference_image, "rust") == first
    after = counters(adapted)
    assert (after["loads"], after["hits"]) == (before["loads"], before["hits"] + 1)
    image_of(adapted, reference_image, "ink")
    image_of(adapted, reference_image, "moss")  # a third one: rust, the least recent, goes
    assert counters(adapted)["loaded"] == ["ink", "moss"]
    evicted = counters(adapted)["loads"]
    assert image_of(adapted, reference_image, "rust") == first  # loaded again, the same adapter
    assert counters(adapted)["loads"] == evicted + 1


def test_an_adapter_of_another_width_fails_the_prediction_naming_it_and_the_model_runs_on(
    adapted: Predictor, reference_image: Image.Image
) -> None:
    plain = image_of(adapted, reference_image)
    with pytest.raises(InvalidLora) as info:
        image_of(adapted, reference_image, "ink", "wide")
    assert (info.value.code, info.value.detail["field"]) == ("lora_incompatible", "input.loras.1.name")
    assert "does not fit this model" in info.value.message and "size mismatch" in info.value.message
    assert "wide" not in counters(adapted)["loaded"]
    assert image_of(adapted, reference_image) == plain
    assert image_of(adapted, reference_image, "ink") != plain


# --- the service -------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, lora_dir: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(), lora_dir=lora_dir) as harness:
        yield harness


def finished(api: Harness, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    done = api.wait_status(response.json()["predictionID"], {"success", "error", "cancelled"})
    return done


def colour(api: Harness, prediction: dict[str, Any]) -> tuple[int, ...]:
    output = prediction["output"]
    url = output[0] if isinstance(output, list) else output
    image = Image.open(io.BytesIO(api.http.get(url).content)).convert("RGB")
    return tuple(image.getpixel((0, 0)))


def test_get_loras_lists_the_usable_adapters(api: Harness, lora_dir: Path) -> None:
    listed = api.http.get("/v1/loras")
    assert listed.status_code == 200, listed.text
    adapters = {a["name"]: a for a in listed.json()["adapters"]}
    assert set(adapters) == {"ink", "moss", "rust", "wide"}  # wide's shapes: only a worker can tell
    assert adapters["ink"] == {
        "name": "ink",
        "source": "local",
        "rank": 4,
        "size": (lora_dir / "ink.safetensors").stat().st_size,
    }
    assert listed.json()["max_loras"] == 3
    assert httpx.get(f"{api.url}/v1/loras").status_code == 401  # a caller's view: needs a key
    from fluxredux.client import FluxRedux

    with FluxRedux(api.url, api.key) as client:  # the Python client's view of the same
        assert sorted(adapter.name for adapter in client.loras().adapters) == ["ink", "moss", "rust", "wide"]


def test_a_prediction_with_adapters_records_them_and_they_change_its_images(api: Harness) -> None:
    def made(**inputs: Any) -> dict[str, Any]:
        done = finished(api, api.create(seed=3, output_format="png", **inputs))
        assert done["status"] == "success", done
        return done

    plain = made()
    assert "loras" not in plain["input"]  # not named: recorded as the hosted API records it
    styled = made(loras=[{"name": "ink", "scale": 0.8}, {"name": "moss.safetensors"}])
    assert styled["input"]["loras"] == [
        {"name": "ink", "scale": 0.8},
        {"name": "moss.safetensors", "scale": 1.0},
    ]
    assert colour(api, styled) != colour(api, plain)
    assert colour(api, made(loras=[{"name": "ink", "scale": 0}])) == colour(api, plain)


@pytest.mark.parametrize(
    ("loras", "field", "code"),
    [
        ([{"name": "nowhere"}], "input.loras.0.name", "lora_not_found"),
        ([{"name": "ink"}, {"name": "style.pt"}], "input.loras.1.name", "lora_not_safetensors"),
        ([{"name": "someone/style"}], "input.loras.0.name", "lora_source_not_allowed"),
        ([{"name": "ink"}] * 4, "input.loras", "too_long"),
        ([{"name": "ink", "scale": 3}], "input.loras.0.scale", "less_than_equal"),
    ],
)
def test_a_create_with_an_adapter_it_cannot_use_is_a_400_naming_the_field(
    api: Harness, loras: list[dict[str, Any]], field: str, code: str
) -> None:
    response = api.create(loras=loras)
    assert response.status_code == 400, response.text
    [named] = response.json()["fields"]
    assert (named["field"], named["type"]) == (field, code)
    assert api.http.get("/v1/prediction/").json()["items"] == []  # nothing was queued


def test_an_adapter_only_the_worker_can_refuse_fails_the_prediction_with_its_field(
    tmp_path: Path, lora_dir: Path, model_cache_dir: Path
) -> None:
    from fluxredux.pipeline.loading import load_model

    model = load_model(Settings(model="demo", cache_dir=model_cache_dir))
    with running_server(tmp_path, model=model, lora_dir=lora_dir) as api:
        done = finished(api, api.create(loras=[{"name": "wide"}], megapixels="0.25", num_inference_steps=1))
        assert done["status"] == "error", done
        assert done["error"].startswith("input.loras.0.name: 'wide' does not fit this model")
        fine = finished(api, api.create(loras=[{"name": "ink"}], megapixels="0.25", num_inference_steps=1))
        assert fine["status"] == "success", fine


def test_adapter_loads_and_hits_reach_metrics_through_the_registry(
    tmp_path: Path, adapted: Predictor, reference_image: Image.Image
) -> None:
    from fluxredux.jobs.registry import WorkerInfo
    from fluxredux.worker.registration import Registration

    image_of(adapted, reference_image, "ink")
    image_of(adapted, reference_image, "ink")  # a hit at least
    counted = counters(adapted)
    with running_server(tmp_path, run_worker=False) as api:
        registry = api.services.registry
        remote = {"process_space": "elsewhere", "loras": {"loaded": ["moss"], "loads": 3, "hits": 7}}
        registry.register(WorkerInfo("gpu-box-2", "gpu-box", 99, "flux", "cuda", "ready", 1, details=remote))
        registration = Registration(registry, "demo-worker", model="demo", device="cpu", every=0.1)
        registration.start()
        try:
            registration.update("ready", **model_details(adapted.model))
            metrics = httpx.get(api.url + "/metrics").text
        finally:
            registration.stop()
    assert "# TYPE fluxredux_lora_loads_total counter" in metrics
    assert f'fluxredux_lora_loads_total{{worker="demo-worker"}} {float(counted["loads"])}' in metrics
    assert f'fluxredux_lora_cache_hits_total{{worker="demo-worker"}} {float(counted["hits"])}' in metrics
    assert 'fluxredux_lora_cache_hits_total{worker="gpu-box-2"} 7.0' in metrics
    assert "ink" in counted["loaded"]


# --- a compiled transformer: adapters hot-swapped into fixed slots -------------------------


@pytest.mark.timeout(900)  # compiling takes minutes on a 2-core CPU
def test_with_compile_adapters_swap_in_without_compiling_and_match_eager(
    model_cache_dir: Path, lora_dir: Path, adapted: Predictor, reference_image: Image.Image, tmp_path: Path
) -> None:
    import numpy as np

    from fluxredux.pipeline.adapters import AdapterBudget
    from fluxredux.pipeline.compilation import compiled_graphs
    from fluxredux.pipeline.demo import demo_model_paths
    from fluxredux.pipeline.redux_model import ReduxModel
    from fluxredux.pipeline.speed import Tuning

    paths = demo_model_paths(model_cache_dir)
    model = ReduxModel.load(
        str(paths.schnell),
        str(paths.redux),
        kind="demo",
        device=torch.device("cpu"),
        tuning=Tuning(compile="transformer", compile_cache=tmp_path / "compile-cache"),
        adapter_budget=AdapterBudget(count=4, max_rank=8),
    )
    compiled = Predictor(model, None, adapters=AdapterFiles(catalog_of(lora_dir)))

    def pixels(data: bytes) -> Any:
        return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)

    before = compiled_graphs()
    asked: list[tuple[str | tuple[str, float], ...]] = [
        (),
        ("ink",),
        ("moss",),
        (("ink", 0.5), ("moss", -1.0)),
        ("rust", "ink", "moss"),
        (("ink", 0.0),),
        (),
    ]
    made = [image_of(compiled, reference_image, *named) for named in asked]
    assert compiled_graphs() == before, "switching adapters compiled a graph"
    assert made[0] == made[-1] == made[-2]  # none, or at scale 0: the same bytes
    assert len({made[1], made[2], made[3], made[4], made[0]}) == 5
    for named, result in zip(asked, made, strict=True):
        eager = image_of(adapted, reference_image, *named)
        difference = np.abs(pixels(result) - pixels(eager))
        assert difference.max() <= 2, f"{named}: max difference {difference.max()}/255"
    details = model.adapters.counters()
    assert details["loaded"] == ["ink", "moss"]  # in the slots now: ink (twice), moss
    assert details["loads"] == 3  # each file read once; the rest were in memory or in place
    # One that does not fit: the prediction fails naming it, nothing is copied, and the
    # model runs on as before, compiling nothing.
    with pytest.raises(InvalidLora) as info:
        image_of(compiled, reference_image, "wide")
    assert info.value.detail["field"] == "input.loras.0.name"
    assert image_of(compiled, reference_image) == made[0]
    assert image_of(compiled, reference_image, "ink") == made[1]
    assert compiled_graphs() == before


def test_a_compiled_model_without_slots_says_once_that_adapters_recompile_it(
    model_cache_dir: Path, lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker compiled before any adapter was offered has no hotswap slots: the first
    adapter it loads tells the operator what that costs and what to do."""
    from fluxredux.pipeline.adapters import AdapterBudget, AdapterCache
    from fluxredux.pipeline.loading import load_model

    model = load_model(Settings(model="demo", cache_dir=model_cache_dir))
    cache = AdapterCache(model.parts.pipe, AdapterBudget(), compiled=True)  # type: ignore[attr-defined]
    files = AdapterFiles(catalog_of(lora_dir))
    with caplog.at_level("WARNING", logger="fluxredux.pipeline.adapters"):
        cache.activate(files.files(uses("ink")))
        cache.activate(files.files(uses("moss")))
    warned = [r.getMessage() for r in caplog.records if "recompiles" in r.getMessage()]
    assert len(warned) == 1 and "restart the worker" in warned[0], warned


def test_predict_on_the_command_line_takes_adapters_from_the_lora_dir(
    tmp_path: Path, model_cache_dir: Path, lora_dir: Path
) -> None:
    from tests.conftest import SAMPLE_IMAGE
    from tests.test_cli import run_cli

    def predict(*flags: str) -> subprocess.CompletedProcess[str]:
        args = (str(SAMPLE_IMAGE), "--megapixels", "0.25", "--num-inference-steps", "1", "--seed", "3")
        return run_cli(
            "predict", *args, "--lora-dir", str(lora_dir), *flags, cache=model_cache_dir, cwd=tmp_path
        )

    made = predict("--loras", '[{"name": "ink", "scale": 0.7}]', "--output-format", "png", "-o", "out")
    assert made.returncode == 0, made.stderr
    assert len(list((tmp_path / "out").iterdir())) == 1
    unknown = predict("--loras", '[{"name": "nowhere"}]', "-o", "none")
    assert unknown.returncode != 0 and "input.loras.0.name" in unknown.stderr, unknown.stderr


def test_a_failed_first_request_leaves_no_adapter_on(
    model_cache_dir: Path, lora_dir: Path, reference_image: Image.Image
) -> None:
    """Its first adapter loaded (and was turned on), its second did not fit: the next request
    without adapters must still run the model's own layers."""
    from fluxredux.pipeline.loading import load_model

    model = load_model(Settings(model="demo", cache_dir=model_cache_dir))
    fresh = Predictor(model, None, adapters=AdapterFiles(catalog_of(lora_dir)))
    with pytest.raises(InvalidLora):
        image_of(fresh, reference_image, "ink", "wide")
    plain = Predictor(load_model(Settings(model="demo", cache_dir=model_cache_dir)), None)
    assert image_of(fresh, reference_image) == image_of(plain, reference_image)


def test_truncated_files_dotted_hub_paths_and_one_file_under_two_names_are_refused(tmp_path: Path) -> None:
    made = tiny_lora(tmp_path / "ink.safetensors", seed=1)
    (tmp_path / "cut.safetensors").write_bytes(made.read_bytes()[: made.stat().st_size // 2])
    (tmp_path / "alias.safetensors").symlink_to(made)
    catalog = LoraCatalog.from_settings(
        Settings(data_dir=tmp_path, lora_dir=tmp_path, lora_sources="hf:studio/*")
    )
    assert refusal(catalog, *uses("cut")) == ("lora_not_safetensors", "input.loras.0.name")
    assert refusal(catalog, *uses("studio/x/../../etc.safetensors")) == (
        "lora_not_found",
        "input.loras.0.name",
    )
    with pytest.raises(InvalidLora) as info:
        AdapterFiles(catalog).files(uses("ink", "alias"))
    assert (info.value.code, info.value.detail["field"]) == ("lora_twice", "input.loras.1.name")


def test_a_hub_adapter_larger_than_the_cache_is_refused_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No internet here: the Hub's listing is stood in for, and a download fails the test."""
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile

    asked: list[tuple[str, list[str]]] = []

    def paths_info(self: Any, repo_id: str, paths: list[str], **_: Any) -> list[Any]:
        asked.append((repo_id, paths))
        return [RepoFile(path=paths[0], size=5 * 2**30, oid="x")] if "huge" in paths[0] else []

    def no_download(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("downloaded")

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", paths_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    catalog = LoraCatalog.from_settings(Settings(data_dir=tmp_path, lora_sources="hf:studio/*"))
    with pytest.raises(InvalidLora) as info:
        AdapterFiles(catalog).files(uses("studio/styles/huge.safetensors"))
    assert (info.value.code, info.value.detail["field"]) == ("lora_too_large", "input.loras.0.name")
    with pytest.raises(InvalidLora) as info:
        AdapterFiles(catalog).files(uses("studio/styles/missing.safetensors"))
    assert info.value.code == "lora_not_found"
    assert asked == [("studio/styles", ["huge.safetensors"]), ("studio/styles", ["missing.safetensors"])]
