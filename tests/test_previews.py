"""Step previews (input ``preview``): the x0 estimate each step decodes, checked against
the latents themselves on the demo model (its TAEF1 tiny and random, loaded through the
real loader); nothing changes without them; and what a caller sees: preview events in the
stream, ``progress.preview`` while it runs, and a 400 naming the field where no worker can
make them."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from fluxredux.pipeline.fake import FakeModel
from fluxredux.pipeline.protocol import GenerationRequest
from tests.harness import running_server
from tests.test_streams import ENDS, read_events


def test_each_step_s_estimate_is_the_clean_latent_the_step_points_at(demo_model: Any) -> None:
    """x0 = x_t - sigma * v, checked against the latents before and after each step (the
    Euler step moves x_t along v to the next sigma), and at the last step (sigma 0 next)
    the estimate is the final latent itself."""
    from fluxredux.pipeline.previews import Estimates, catching_estimates

    pipe = demo_model.parts.pipe
    width = height = 64
    channels = pipe.transformer.config.in_channels
    tokens = (width // 16) * (height // 16)
    generator = torch.Generator("cpu").manual_seed(3)
    start = torch.randn(1, tokens, channels, generator=generator)
    text_dim = pipe.transformer.config.joint_attention_dim
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    seen: list[torch.Tensor] = [start.clone()]
    estimates: list[torch.Tensor] = []
    caught = Estimates()

    def after_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(tensors["latents"].clone())
        assert caught.latest is not None
        estimates.append(caught.latest.clone())
        return {}

    with catching_estimates(pipe.transformer, caught):
        final = pipe(
            prompt_embeds=torch.randn(1, 8, text_dim, generator=generator),
            pooled_prompt_embeds=torch.randn(1, pooled_dim, generator=generator),
            latents=start.clone(),
            width=width,
            height=height,
            num_inference_steps=4,
            guidance_scale=0.0,
            output_type="latent",
            callback_on_step_end=after_step,
        ).images
    sigmas = pipe.scheduler.sigmas
    assert len(estimates) == 4
    for step, estimate in enumerate(estimates):
        before, after = seen[step].float(), seen[step + 1].float()
        velocity = (after - before) / (sigmas[step + 1] - sigmas[step])
        reference = before - sigmas[step] * velocity
        assert torch.allclose(estimate, reference, atol=1e-4), f"step {step}"
    assert torch.allclose(estimates[-1], final.float(), atol=1e-5)
    # The hook is gone with the block: a run after it catches nothing.
    caught.latest = None
    demo_model.parts.pipe.transformer(
        hidden_states=start,
        timestep=torch.tensor([1.0]),
        encoder_hidden_states=torch.randn(1, 8, text_dim),
        pooled_projections=torch.randn(1, pooled_dim),
        txt_ids=torch.zeros(8, 3),
        img_ids=torch.zeros(tokens, 3),
        return_dict=False,
    )
    assert caught.latest is None


def request(**fields: Any) -> GenerationRequest:
    from fluxredux.images import DecodeLimits, decode_image
    from tests.conftest import SAMPLE_IMAGE

    image = decode_image(SAMPLE_IMAGE.read_bytes(), DecodeLimits()).resize((64, 64))
    base: dict[str, Any] = {
        "references": [(image, 1.0)],
        "width": 128,
        "height": 96,
        "num_outputs": 1,
        "num_inference_steps": 3,
        "seed": 11,
    }
    return GenerationRequest(**{**base, **fields})


def test_previews_change_nothing_in_the_images_and_are_small_jpegs(demo_model: Any) -> None:
    import numpy as np

    assert demo_model.previews_available
    plain = demo_model.generate(request())
    previews: list[tuple[int, bytes]] = []
    shown = demo_model.generate(request(), on_preview=lambda step, jpeg: previews.append((step, jpeg)))
    assert all(np.array_equal(a, b) for a, b in zip(plain.images, shown.images, strict=True))
    assert "previews" in shown.timings and "previews" not in plain.timings
    assert [step for step, _ in previews] == [1, 2, 3]
    for _, jpeg in previews:
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
            assert image.size == (128, 96)  # the output's proportions (under 256 px: as is)


def test_the_last_preview_is_taef1_s_decode_of_the_final_latents(demo_model: Any) -> None:
    """What the last preview shows is what TAEF1 makes of the latents the VAE decodes."""
    from fluxredux.pipeline import denoising

    captured: dict[str, torch.Tensor] = {}
    real_decode = denoising.decode

    def keep_latents(pipe: Any, latents: torch.Tensor, **kwargs: Any) -> Any:
        captured["latents"] = latents.clone()
        return real_decode(pipe, latents, **kwargs)

    arrays: list[Any] = []
    previews = demo_model.previews
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(denoising, "decode", keep_latents)
        patch.setattr(
            previews, "jpeg", lambda packed, w, h: arrays.append(previews.decode_array(packed, w, h)) or b"x"
        )
        demo_model.generate(request(), on_preview=lambda step, jpeg: None)
    import numpy as np

    reference = previews.decode_array(captured["latents"].float(), 128, 96)
    assert np.abs(arrays[-1].astype(int) - reference.astype(int)).max() <= 1


# --- what a caller sees --------------------------------------------------------------------


def test_a_previewing_prediction_streams_a_preview_after_each_step(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.2)) as api:
        prediction = api.create_id(preview=True, num_inference_steps=4)
        events = []
        with api.http.stream("GET", f"/v1/prediction/{prediction}/stream", timeout=60) as response:
            for event in read_events(response):
                events.append(event)
                if event.name == "preview" and json.loads(event.data)["step"] == 2:
                    running = api.get(prediction)  # meanwhile, the prediction shows it too
                if event.name in ENDS:
                    break
        names = [event.name for event in events]
        previews = [json.loads(event.data) for event in events if event.name == "preview"]
        assert [preview["step"] for preview in previews] == [1, 2, 3, 4]
        for preview in previews:
            head, _, data = preview["image"].partition(",")
            assert head == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"
        assert names.index("preview") == names.index("step") + 1  # each step, then its preview
        assert running["progress"]["preview"].startswith("data:image/jpeg;base64,")
        done = api.get(prediction)
        assert "preview" not in done["progress"]  # not kept after the end
        assert done["input"]["preview"] is True
        plain = api.get(api.create_id(), wait=30)
        assert "preview" not in plain["input"]  # recorded only when asked for, as before it existed


class NoPreviews(FakeModel):
    previews_available = False  # as a worker without TAEF1's weights


def test_preview_where_no_worker_can_make_them_is_a_400_naming_the_field(tmp_path: Path) -> None:
    with running_server(tmp_path, model=NoPreviews()) as api:
        refused = api.create(preview=True)
        assert refused.status_code == 400, refused.text
        body = refused.json()
        assert body["field"] == "input.preview" and body["fields"][0]["type"] == "previews_unavailable"
        assert api.get(api.create_id(), wait=30)["status"] == "success"  # without it: as ever
        assert httpx.get(api.url + "/health").json()["model"]["previews"] is False


def test_a_large_output_s_preview_is_decoded_from_a_latent_averaged_down(demo_model: Any) -> None:
    """A 1 MP output's preview: the latent averaged by 4 before TAEF1, 256 px decoded."""
    previews = demo_model.previews
    packed = torch.randn(1, 64 * 64, 64, generator=torch.Generator().manual_seed(1))
    assert previews.decode_array(packed, 1024, 1024).shape == (256, 256, 3)
    assert previews.decode_array(packed[:, : 64 * 32], 1024, 512).shape == (128, 256, 3)
