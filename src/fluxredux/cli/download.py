"""``fluxredux download``: fetch the real weights into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from fluxredux.cli.app import VerboseOption, app, err, fail, out, setup_logging
from fluxredux.errors import FluxReduxError
from fluxredux.weights import LICENSE_NOTE, REDUX, SCHNELL, download_weights


@app.command()
def download(
    schnell: Annotated[str, typer.Option(help="FLUX.1 [schnell] repo id.")] = SCHNELL.default_repo,
    redux: Annotated[str, typer.Option(help="FLUX.1 Redux repo id (gated).")] = REDUX.default_repo,
    token: Annotated[
        str | None,
        typer.Option(envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or hf login)."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Download FLUX.1 [schnell] and the Redux prior (diffusers files only, ~24 GB)."""
    setup_logging(verbose)
    err.print(LICENSE_NOTE, highlight=False)
    try:
        for spec, repo in ((REDUX, redux), (SCHNELL, schnell)):  # the gated one first: fail fast
            err.print(f"downloading {spec.title} from {repo} ...", highlight=False)
            path = download_weights(spec, repo, token=token)
            out.print(f"{spec.title}: {path}", highlight=False)
    except FluxReduxError as exc:
        raise fail(exc) from None
