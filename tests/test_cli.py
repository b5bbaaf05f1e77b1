"""`fluxredux predict` as a user runs it: a real process, real files, plain errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SAMPLE_IMAGE
from tests.helpers import FLUXREDUX


def run_cli(*args: str, cache: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "FLUXREDUX_CACHE_DIR": str(cache),
        "CUDA_VISIBLE_DEVICES": "",  # `auto` must pick the demo model even on a GPU box
        "COLUMNS": "200",
        **env,
    }
    environment.pop("FLUXREDUX_MODEL", None)
    return subprocess.run(
        [FLUXREDUX, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300
    )


def test_predict_writes_the_asked_size_and_format_and_prints_the_seed(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    args = (str(SAMPLE_IMAGE), "--aspect-ratio", "16:9", "--output-format", "png", "-o", "out/")
    result = run_cli("predict", *args, cache=model_cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (written,) = (tmp_path / "out").iterdir()
    with Image.open(written) as image:
        assert (image.format, image.size) == ("PNG", (1344, 768))
    assert f"{Path('out') / written.name}  1344x768  " in result.stdout
    assert "seed: " in result.stdout and result.stdout.strip().splitlines()[-1].startswith("seed: ")
    # No GPU here: auto picked the demo model, and both streams say so.
    assert "demo model: random weights, outputs are noise" in result.stdout
    assert "DEMO model" in result.stderr
    assert "4/4" in result.stderr  # the per-step progress bar ran to the end


def test_same_seed_twice_gives_identical_files(tmp_path: Path, model_cache_dir: Path) -> None:
    for out in ("a", "b"):
        args = (str(SAMPLE_IMAGE), "--seed", "7", "--megapixels", "0.25", "--num-outputs", "2", "-o", out)
        result = run_cli("predict", *args, cache=model_cache_dir, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("seed: 7")
    first = sorted((tmp_path / "a").iterdir())
    second = sorted((tmp_path / "b").iterdir())
    assert [p.name for p in first] == ["sample-7-0.webp", "sample-7-1.webp"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_bad_flags_are_named_and_nothing_runs(tmp_path: Path, model_cache_dir: Path) -> None:
    args = (str(SAMPLE_IMAGE), "--num-outputs", "9", "--aspect-ratio", "5:7", "-o", "out")
    result = run_cli("predict", *args, cache=model_cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert "--num-outputs: Input should be less than or equal to 4" in result.stderr
    assert "--aspect-ratio: Input should be" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "image_empty"),
        (b"hello, I am a text file" * 4, "image_not_an_image"),
        (b"BM" + bytes(60), "image_unsupported_format"),
    ],
)
def test_bad_image_files_get_their_specific_error(
    tmp_path: Path, model_cache_dir: Path, content: bytes, code: str
) -> None:
    (tmp_path / "bad.jpg").write_bytes(content)
    result = run_cli("predict", "bad.jpg", cache=model_cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert f"error ({code})" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_real_weights_fail_fast_with_instructions(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "predict", str(SAMPLE_IMAGE), "--model", "flux", cache=model_cache_dir, cwd=tmp_path,
        HF_HUB_CACHE=str(tmp_path / "empty-hf-cache"), HF_HUB_OFFLINE="1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "error (weights_not_found)" in result.stderr
    assert "fluxredux download" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_input_field_is_a_flag() -> None:
    from fluxredux.cli.input_flags import NOT_FLAGS
    from fluxredux.schema import PredictionInput

    result = subprocess.run(
        [FLUXREDUX, "predict", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert {"redux_image", "preview"} == NOT_FLAGS  # the positional image; run's --preview DIR
    for field in PredictionInput.model_fields:
        if field not in NOT_FLAGS:
            assert "--" + field.replace("_", "-") in result.stdout


def test_predict_with_the_fake_model_needs_no_torch(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "predict", str(SAMPLE_IMAGE), "--model", "fake", "--num-outputs", "2", "-o", "o",
        "--disable-safety-checker", cache=model_cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "o").iterdir())) == 2
    assert "fake model" in result.stdout


def test_run_says_plainly_when_the_server_is_unreachable(tmp_path: Path, model_cache_dir: Path) -> None:
    from tests.harness import free_port

    result = run_cli(
        "run", str(SAMPLE_IMAGE), "--server", f"http://127.0.0.1:{free_port()}", "--key", "fr_x_y",
        cache=model_cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_checks_flags_before_calling_the_server(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "run", str(SAMPLE_IMAGE), "--server", "http://127.0.0.1:9", "--key", "fr_x_y", "--megapixels", "2",
        cache=model_cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--megapixels: Input should be '1' or '0.25'" in result.stderr


def test_several_references_from_the_command_line(tmp_path: Path, model_cache_dir: Path) -> None:
    """--redux-images takes the list as JSON (local files here); weights [1, 0] give the
    first file alone, byte for byte."""
    other = tmp_path / "other.png"
    Image.new("RGB", (40, 60), (10, 200, 90)).save(other)
    common = ("--seed", "9", "--megapixels", "0.25", "--output-format", "png")
    alone = run_cli("predict", str(SAMPLE_IMAGE), *common, "-o", "alone", cache=model_cache_dir, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    mix = json.dumps([{"image": str(SAMPLE_IMAGE), "weight": 1}, {"image": str(other), "weight": 0}])
    mixed = run_cli(
        "predict", "--redux-images", mix, *common, "-o", "mixed", cache=model_cache_dir, cwd=tmp_path
    )
    assert mixed.returncode == 0, mixed.stderr
    [first], [second] = list((tmp_path / "alone").iterdir()), list((tmp_path / "mixed").iterdir())
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((str(SAMPLE_IMAGE), "--redux-images", '[{"image": "a.png"}]'), "not both"),
        ((), "give a reference IMAGE"),
        (("--redux-images", "[{"), "--redux-images: not valid JSON"),
        (("--redux-images", '[{"image": "a.png", "weight": -1}]'), "--redux-images"),
    ],
)
def test_references_on_the_command_line_are_checked(
    tmp_path: Path, model_cache_dir: Path, args: tuple[str, ...], says: str
) -> None:
    result = run_cli("predict", *args, cache=model_cache_dir, cwd=tmp_path)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, (
        result.stderr
    )


def test_run_uploads_the_local_files_among_several_references(tmp_path: Path) -> None:
    from tests.harness import running_server

    other = tmp_path / "other.png"
    Image.new("RGB", (40, 60), (10, 200, 90)).save(other)
    mix = json.dumps([{"image": str(SAMPLE_IMAGE), "weight": 3}, {"image": str(other), "weight": 1}])
    with running_server(tmp_path) as api:
        args = ("--redux-images", mix, "--server", api.url, "--key", api.key, "--megapixels", "0.25")
        result = run_cli("run", *args, "-o", "out", cache=tmp_path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        [job] = api.services.store.list_by_owner(api.services.keys.list()[0].id, 5)
        assert [item["weight"] for item in job.input["redux_images"]] == [3, 1]
        assert api.services.uploads.uploaded(job.input_files) == set(job.input_files)  # both uploaded
    assert len(list((tmp_path / "out").iterdir())) == 1


# --- issue 22: a prompt alone, a custom size, and `fluxredux upscale` (a final from a draft)


def test_run_a_prompt_alone_at_a_custom_size(tmp_path: Path) -> None:
    from tests.harness import running_server

    with running_server(tmp_path) as api:
        args = ("--prompt", "a lighthouse at dusk", "--width", "512", "--height", "256", "--seed", "3")
        result = run_cli(
            "run", *args, "--server", api.url, "--key", api.key, "-o", "out", cache=tmp_path, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        [job] = api.services.store.list_by_owner(api.services.keys.list()[0].id, 5)
        assert (job.input["redux_image"], job.input["prompt"]) == (None, "a lighthouse at dusk")
    [written] = (tmp_path / "out").iterdir()
    assert written.name == "prompt-3-0.webp"  # no reference to name it after
    with Image.open(written) as image:
        assert image.size == (512, 256)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "give a reference IMAGE (or several with --redux-images), or a --prompt alone"),
        (("--prompt", "   "), "give a reference IMAGE (or several with --redux-images), or a --prompt alone"),
        ((str(SAMPLE_IMAGE), "--width", "512"), "--height: width and height go together: give both"),
        (
            (str(SAMPLE_IMAGE), "--width", "500", "--height", "512"),
            "--width: Input should be a multiple of 16",
        ),
        ((str(SAMPLE_IMAGE), "--scale", "2"), "--scale: scale needs upscale_from"),
        (("--upscale-from", "{"), "--upscale-from: not valid JSON"),
    ],
)
def test_run_checks_the_reference_and_the_size_before_calling_the_server(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    # Port 9 (discard): a call would fail as "cannot reach the server", exit 1.
    result = run_cli(
        "run", *args, "--server", "http://127.0.0.1:9", "--key", "fr_x_y", cache=tmp_path, cwd=tmp_path
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line


def test_run_help_shows_the_size_and_upscale_flags() -> None:
    shown = subprocess.run(
        [FLUXREDUX, "run", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    ).stdout
    for flag, takes in [
        ("--width", "<int>"),
        ("--height", "<int>"),
        ("--upscale-from", "<json>"),
        ("--scale", "<2|4>"),
    ]:
        assert f"{flag} {takes}" in shown, shown
    assert "--prompt alone" in shown  # the image argument says it may be left out


def test_upscale_makes_the_final_waits_and_downloads_it(tmp_path: Path) -> None:
    from tests.harness import running_server

    with running_server(tmp_path) as api:
        draft = api.create_id(megapixels="0.25", num_outputs=2, seed=11)
        assert api.get(draft, wait=20)["status"] == "success"
        args = (draft, "--index", "1", "--scale", "2", "--strength", "0.5", "--seed", "5")
        result = run_cli(
            "upscale",
            *args,
            "--server",
            api.url,
            "--api-key",
            api.key,
            "-o",
            "out",
            cache=tmp_path,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        final = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
        assert final.input["upscale_from"] == {"prediction": draft, "index": 1}
        assert (final.input["scale"], final.input["upscale_strength"], final.input["seed"]) == (2, 0.5, 5)
        assert api.get(final.id)["upscaled_from"] == {"prediction": draft, "index": 1}
    [written] = (tmp_path / "out").iterdir()
    assert written.name == f"{draft}-1-x2-5-0.webp"  # the draft, its output, the scale; the seed
    with Image.open(written) as image:
        assert image.size == (1024, 1024)
    assert f"{Path('out') / written.name}  " in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "seed: 5"
    assert "success, downloaded" in result.stderr  # run's progress line, the same to the end


def test_upscale_keeps_the_draft_s_seed_unless_given(tmp_path: Path) -> None:
    from tests.harness import running_server

    with running_server(tmp_path) as api:
        draft = api.create_id(megapixels="0.25", seed=11)
        assert api.get(draft, wait=20)["status"] == "success"
        common = ("--server", api.url, "--key", api.key, "-o", "out")
        result = run_cli("upscale", draft, "--scale", "4", *common, cache=tmp_path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    [written] = (tmp_path / "out").iterdir()
    assert written.name == f"{draft}-0-x4-11-0.webp"
    with Image.open(written) as image:
        assert image.size == (2048, 2048)


def test_upscale_s_bad_values_are_named_and_nothing_is_sent(tmp_path: Path) -> None:
    result = run_cli(
        "upscale", "not/an/id", "--scale", "3", "--strength", "0", "--index", "7",
        "--server", "http://127.0.0.1:9", "--key", "fr_x_y", cache=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    named = [
        "ID: String should match pattern",
        "--scale: must be one of 2, 4",
        "--strength: Input should be greater than 0",
        "--index: Input should be less than or equal to 3",
    ]
    for says in named:
        assert says in result.stderr, result.stderr
    assert "cannot reach" not in result.stderr and "Traceback" not in result.stderr


def test_upscale_of_a_draft_the_server_has_not_says_so(tmp_path: Path) -> None:
    from tests.harness import running_server

    with running_server(tmp_path) as api:
        common = ("--server", api.url, "--key", api.key, "-o", "out")
        result = run_cli("upscale", "no-such-draft", *common, cache=tmp_path, cwd=tmp_path)
        draft = api.create_id(megapixels="0.25")
        assert api.get(draft, wait=20)["status"] == "success"
        out_of_range = run_cli("upscale", draft, "--index", "2", *common, cache=tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and "error (not_found)" in result.stderr, result.stderr
    assert "no prediction 'no-such-draft'" in result.stderr and "Traceback" not in result.stderr
    assert out_of_range.returncode == 1 and "upscale_from.index" in out_of_range.stderr, out_of_range.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_predict_says_a_final_needs_the_server(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "predict",
        "--upscale-from",
        '{"prediction": "abc123"}',
        "--model",
        "fake",
        cache=model_cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "fluxredux upscale ID" in result.stderr, result.stderr


def test_predict_a_prompt_alone(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "predict", "--prompt", "a red kite", "--model", "fake", "--width", "320", "--height", "256",
        "--seed", "4", "-o", "o", cache=model_cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "o/prompt-4-0.webp  320x256  " in result.stdout


def test_run_makes_a_final_with_upscale_from_and_no_image(tmp_path: Path) -> None:
    """The create's own way to a final (what `upscale` shortens): --upscale-from as JSON, and
    --scale, a choice of numbers, given as text as every flag is."""
    from tests.harness import running_server

    with running_server(tmp_path) as api:
        draft = api.create_id(megapixels="0.25", aspect_ratio="16:9", seed=8)
        assert api.get(draft, wait=20)["status"] == "success"
        args = ("--upscale-from", json.dumps({"prediction": draft}), "--scale", "4")
        result = run_cli(
            "run", *args, "--server", api.url, "--key", api.key, "-o", "out", cache=tmp_path, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    [written] = (tmp_path / "out").iterdir()
    assert written.name == f"{draft}-0-x4-8-0.webp"
    with Image.open(written) as image:
        assert image.size == (672 * 4, 384 * 4)


def test_run_with_preview_writes_each_step_s_preview_from_the_stream(tmp_path: Path) -> None:
    from fluxredux.pipeline.fake import FakeModel
    from tests.harness import running_server

    with running_server(tmp_path, model=FakeModel(step_seconds=0.2)) as api:
        args = (str(SAMPLE_IMAGE), "--server", api.url, "--key", api.key, "--num-inference-steps", "3")
        result = run_cli("run", *args, "--preview", "steps", "-o", "out", cache=tmp_path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        [job] = api.services.store.list_by_owner(api.services.keys.list()[0].id, 5)
        assert job.input["preview"] is True
    written = sorted(path.name for path in (tmp_path / "steps").iterdir())
    assert written == [f"{job.id}-step-{step}.jpg" for step in (1, 2, 3)]
    for name in written:
        with Image.open(tmp_path / "steps" / name) as image:
            assert image.format == "JPEG"
    assert len(list((tmp_path / "out").iterdir())) == 1  # and the image itself, as ever
