"""Drafts to finals (over HTTP, the fake model): a custom width and height, a prompt with no
reference, and a final upscaled from one output of the caller's own finished draft, with
the draft's conditioning and seed, through `upscale_from` and the shortcut route."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fluxredux.pipeline.fake import FakeModel
from tests.harness import Harness, running_server


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel()) as harness:
        yield harness


def body(**inputs: Any) -> dict[str, Any]:
    return {"input": {"disable_safety_checker": True, "output_format": "png", **inputs}}


def finished(api: Harness, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    done = api.wait_status(response.json()["predictionID"], {"success", "error", "cancelled"})
    assert done["status"] == "success", done
    return done


def images(api: Harness, prediction: dict[str, Any]) -> list[Image.Image]:
    urls = prediction["output"] if isinstance(prediction["output"], list) else [prediction["output"]]
    return [Image.open(io.BytesIO(api.http.get(url).content)) for url in urls]


def refused(response: httpx.Response, status: int = 400) -> str:
    """The field a refusal names."""
    assert response.status_code == status, response.text
    answer = response.json()
    return str(answer.get("field") or answer["fields"][0]["field"])


# --- custom sizes ---------------------------------------------------------------------------


def test_a_custom_width_and_height_make_images_of_that_size(api: Harness) -> None:
    done = finished(
        api, api.http.post("/v1/prediction/", json=api.body(width=1536, height=512, num_outputs=2))
    )
    assert [image.size for image in images(api, done)] == [(1536, 512)] * 2
    assert (done["input"]["width"], done["input"]["height"]) == (1536, 512)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"width": 512}, "height"),
        ({"height": 512}, "width"),
        ({"width": 500, "height": 512}, "width"),  # not a multiple of 16
        ({"width": 4096, "height": 512}, "width"),
        ({"width": 512, "height": 240}, "height"),
        ({"width": 512, "height": 512, "aspect_ratio": "16:9"}, "width"),
        ({"width": 512, "height": 512, "megapixels": "0.25"}, "width"),
        ({"width": True, "height": 512}, "width"),
    ],
)
def test_a_bad_custom_size_is_a_400_naming_the_field(
    api: Harness, fields: dict[str, Any], named: str
) -> None:
    assert refused(api.create(**fields)) == f"input.{named}"


def test_openapi_shows_the_custom_sizes_constraints(api: Harness) -> None:
    openapi = api.http.get("/openapi.json").json()
    schema = openapi["components"]["schemas"]["PredictionInput"]["properties"]
    assert "/v1/prediction/{prediction_id}/upscale" in openapi["paths"]
    width = next(option for option in schema["width"]["anyOf"] if option.get("type") == "integer")
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (256, 2048, 16)


# --- a prompt alone -------------------------------------------------------------------------


def test_a_prompt_alone_makes_images(api: Harness) -> None:
    created = api.http.post("/v1/prediction/", json=body(prompt="a red fox in the snow", megapixels="0.25"))
    done = finished(api, created)
    assert [image.size for image in images(api, done)] == [(512, 512)]
    assert done["input"]["redux_image"] is None and done["input"]["prompt"] == "a red fox in the snow"


def test_neither_a_prompt_nor_a_reference_is_a_400_naming_redux_image(api: Harness) -> None:
    assert refused(api.http.post("/v1/prediction/", json=body())) == "input.redux_image"
    # A prompt alone has no proportions to match.
    assert refused(api.http.post("/v1/prediction/", json=body(prompt="x", aspect_ratio="match_input"))) == (
        "input.aspect_ratio"
    )


def test_the_hosted_contract_is_unchanged_without_the_new_fields(api: Harness) -> None:
    done = finished(api, api.create(seed=3))
    assert "upscaled_from" not in done  # a final's field only
    # Nor does the input's echo grow: the new fields are recorded only where used.
    assert not {"width", "height", "upscale_from", "scale", "upscale_strength"} & done["input"].keys()
    custom = finished(api, api.create(seed=3, width=512, height=256))
    assert (custom["input"]["width"], custom["input"]["height"]) == (512, 256)
    assert "upscale_strength" not in custom["input"] and "scale" not in custom["input"]


# --- finals from drafts ---------------------------------------------------------------------


def draft_of(api: Harness, **fields: Any) -> dict[str, Any]:
    inputs = {"aspect_ratio": "16:9", "megapixels": "0.25", "seed": 42, "num_outputs": 2, **fields}
    return finished(api, api.http.post("/v1/prediction/", json=api.body(**inputs, output_format="png")))


@pytest.mark.parametrize(
    ("aspect_ratio", "scale", "size"),
    [
        ("16:9", 2, (1344, 768)),
        ("16:9", 4, (2688, 1536)),
        ("1:1", 2, (1024, 1024)),
        ("9:21", 4, (1280, 3072)),
    ],
)
def test_a_final_is_its_draft_times_the_scale(
    api: Harness, aspect_ratio: str, scale: int, size: tuple[int, int]
) -> None:
    draft = draft_of(api, aspect_ratio=aspect_ratio)
    upscale = {"upscale_from": {"prediction": draft["id"], "index": 1}, "scale": scale}
    final = finished(api, api.http.post("/v1/prediction/", json=body(**upscale)))
    assert [image.size for image in images(api, final)] == [size]
    assert final["upscaled_from"] == {"prediction": draft["id"], "index": 1}
    assert final["seed"] == draft["seed"] == 42  # the draft's seed, unless one is given


def test_the_shortcut_makes_the_same_final_keeping_the_drafts_picture(api: Harness) -> None:
    draft = draft_of(api)
    shortcut = api.http.post(
        f"/v1/prediction/{draft['id']}/upscale", json={"index": 0, "output_format": "png"}
    )
    final = finished(api, shortcut)
    assert final["input"]["scale"] == 2 and final["input"]["upscale_strength"] == 0.35
    [picture] = images(api, final)
    assert picture.size == (1344, 768)
    # The fake model refines by blending: what the draft showed is still there, mostly.
    drafted = images(api, draft)[0].convert("RGB").resize(picture.size)
    difference = np.abs(np.asarray(picture, dtype=np.int16) - np.asarray(drafted, dtype=np.int16))
    assert difference.mean() < 0.5 * 255
    same = finished(
        api, api.http.post("/v1/prediction/", json=body(upscale_from={"prediction": draft["id"]}))
    )
    assert api.http.get(same["output"]).content == api.http.get(final["output"]).content


def test_a_final_may_ask_its_own_size_seed_and_strength(api: Harness) -> None:
    draft = draft_of(api)
    fields = {
        "upscale_from": {"prediction": draft["id"]},
        "megapixels": "1",
        "seed": 7,
        "upscale_strength": 1.0,
    }
    final = finished(api, api.http.post("/v1/prediction/", json=body(**fields)))
    assert [image.size for image in images(api, final)] == [(1360, 768)]  # the draft's proportions at 1 MP
    assert final["seed"] == 7
    custom = {"upscale_from": {"prediction": draft["id"]}, "width": 1024, "height": 576}
    assert [
        i.size for i in images(api, finished(api, api.http.post("/v1/prediction/", json=body(**custom))))
    ] == [(1024, 576)]


def test_a_draft_that_is_not_the_callers_or_not_usable_is_refused_naming_upscale_from(api: Harness) -> None:
    draft = draft_of(api)
    _, other = api.services.keys.create("someone else")
    theirs = httpx.post(
        f"{api.url}/v1/prediction/",
        json=body(upscale_from={"prediction": draft["id"]}),
        headers={"X-API-Key": other},
    )
    assert refused(theirs, 404) == "input.upscale_from"
    assert refused(api.http.post("/v1/prediction/unknown-id/upscale", json={}), 404) == "input.upscale_from"
    out_of_range = api.http.post(f"/v1/prediction/{draft['id']}/upscale", json={"index": 2})
    assert refused(out_of_range) == "input.upscale_from.index"
    largest = api.http.post("/v1/prediction/", json=body(upscale_from={"prediction": draft["id"]}, scale=4))
    finished(
        api, largest
    )  # 16:9 at 0.25 MP x4 is 2688x1536: under 4 MP (waited for: no job outlives the test)
    big = finished(api, api.http.post("/v1/prediction/", json=api.body(seed=1)))  # 1 MP
    past = api.http.post("/v1/prediction/", json=body(upscale_from={"prediction": big["id"]}, scale=4))
    assert refused(past) == "input.scale" and "4 MP" in past.json()["error"]
    bad = api.http.post("/v1/prediction/", json=body(upscale_from={"prediction": draft["id"]}, scale=3))
    assert refused(bad) == "input.scale"
    alone = api.http.post("/v1/prediction/", json=api.body(scale=2))
    assert refused(alone) == "input.scale"


def test_a_draft_not_finished_is_refused_naming_upscale_from(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(), run_worker=False) as api:
        waiting = api.create_id(seed=1)  # no worker: it stays queued
        early = api.http.post(f"/v1/prediction/{waiting}/upscale", json={})
        assert refused(early) == "input.upscale_from" and "only a finished one" in early.json()["error"]


def test_a_draft_whose_files_are_gone_is_a_404_naming_upscale_from(api: Harness) -> None:
    done = draft_of(api)
    stored = api.services.store.get(done["id"])
    assert stored is not None
    api.services.blobs.delete(stored.output)
    gone = api.http.post(f"/v1/prediction/{done['id']}/upscale", json={})
    assert refused(gone, 404) == "input.upscale_from" and "no longer stored" in gone.json()["error"]


def test_a_final_keeps_its_inputs_when_its_draft_is_deleted(api: Harness) -> None:
    done = finished(api, api.create(seed=5, megapixels="0.25"))
    final_id = api.http.post(f"/v1/prediction/{done['id']}/upscale", json={}).json()["predictionID"]
    stored, final = api.services.store.get(done["id"]), api.services.store.get(final_id)
    assert stored is not None and final is not None
    # Copies of its own: the draft's reference and output, not links to them.
    assert len(final.input_files) == 2 and not set(final.input_files) & {*stored.input_files, *stored.output}
    api.services.blobs.delete([*stored.input_files, *stored.output])  # the draft's files go
    assert api.wait_status(final_id, {"success", "error"})["status"] == "success"


def test_a_final_needs_something_to_steer_it(api: Harness) -> None:
    draft = draft_of(api)
    nothing = {"upscale_from": {"prediction": draft["id"]}, "redux_image": None}
    assert refused(api.http.post("/v1/prediction/", json=body(**nothing))) == "input.redux_image"
    ratio = {"upscale_from": {"prediction": draft["id"]}, "aspect_ratio": "1:1"}
    assert refused(api.http.post("/v1/prediction/", json=body(**ratio))) == "input.aspect_ratio"
    many = {"upscale_from": {"prediction": draft["id"]}, "scale": 4, "num_outputs": 2}
    answer = api.http.post("/v1/prediction/", json=body(**many))
    assert refused(answer) == "input.num_outputs" and "4 MP" in answer.json()["error"]
    custom = api.create(width=2048, height=2048, num_outputs=2)
    assert refused(custom) == "input.num_outputs"


def test_a_shared_final_does_not_name_its_draft(api: Harness) -> None:
    draft = draft_of(api)
    final = finished(api, api.http.post(f"/v1/prediction/{draft['id']}/upscale", json={"index": 1}))
    link = api.http.post(f"/v1/prediction/{final['id']}/share", json={}).json()
    shared = httpx.get(f"{api.url}/v1/share/{link['token']}").json()
    assert shared["input"]["upscale_from"] == {"index": 1}
    assert draft["id"] not in str(shared)


def test_the_replicate_surface_takes_all_three(api: Harness) -> None:
    model = "/v1/models/black-forest-labs/flux-redux-schnell/predictions"
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30) as http:

        def run(**inputs: Any) -> dict[str, Any]:
            created = http.post(model, json={"input": inputs}, headers={"Prefer": "wait=20"})
            assert created.status_code == 201, created.text
            answer = dict(created.json())
            assert answer["status"] == "succeeded", answer
            return answer

        def size(answer: dict[str, Any]) -> tuple[int, int]:
            url = answer["output"][0] if isinstance(answer["output"], list) else answer["output"]
            return Image.open(io.BytesIO(http.get(url).content)).size

        custom = run(redux_image=api.body()["input"]["redux_image"], width=768, height=256)
        assert size(custom) == (768, 256)
        assert size(run(prompt="a lighthouse", megapixels="0.25")) == (512, 512)
        final = run(upscale_from={"prediction": custom["id"]}, scale=2)
        assert size(final) == (1536, 512) and final["input"]["upscale_from"]["prediction"] == custom["id"]
        refused = http.post(model, json={"input": {}})
        assert refused.status_code in (400, 422) and "redux_image" in refused.text, refused.text


def test_an_upscale_counts_against_the_limits_like_any_create(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(), rate_limit_per_minute=2) as api:
        draft = finished(api, api.create(seed=2, megapixels="0.25"))
        finished(api, api.http.post(f"/v1/prediction/{draft['id']}/upscale", json={}))
        over = api.http.post(f"/v1/prediction/{draft['id']}/upscale", json={})
        assert over.status_code == 429 and "Retry-After" in over.headers, over.text
