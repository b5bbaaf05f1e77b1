"""torch.compile for the model, compiled once at worker start, never per request.

Requests come in 22 sizes and 1-4 outputs; compiled for static shapes that would be dozens
of compiles, each of them stalling a request. Compiled with dynamic shapes instead, one
graph covers every size and batch, except where torch specialises: a batch of 1 is its own
graph (sizes of 1 always are), and so is the presence of an attention bias (a tensor or
None). ``warm_up`` in the model runs each of those few graphs once, at worker start, with
its progress logged; afterwards no request compiles (a test counts the graphs over mixed
requests).

The compiled code is cached on disk (inductor's FX graph cache) under the data dir, so a
restarted worker recompiles from cache in a fraction of the first time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import SiglipVisionModel

from fluxredux.config import CompileMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileTargets:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    image_encoder: SiglipVisionModel


def use_compile_cache(folder: Path) -> None:
    """Keep inductor's compiled code in ``folder``, so restarts reuse it. (Inductor reads
    its cache location from the environment only; this process is the worker, which owns
    its environment.)"""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    torch._inductor.config.fx_graph_cache = True


def compile_modules(targets: CompileTargets, mode: CompileMode) -> None:
    """Mark the modules ``mode`` names for compilation (in place: the pipeline keeps the
    same objects). Nothing compiles until their first call: see the model's ``warm_up``."""
    if mode == "none":
        return
    # Not fullgraph=True: with it, a compile that failed cannot fall back to eager (see
    # eager_on_failure). The warm-up's graph count shows a graph break all the same.
    targets.transformer.compile(dynamic=True)
    if mode == "all":
        targets.vae.decoder.compile(dynamic=True)
        targets.image_encoder.compile(dynamic=True)


def compiled_graphs() -> int:
    """Graphs compiled in this process so far: a request that compiled shows here."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def graphs_from_disk() -> int:
    """Compiled code found in inductor's on-disk cache so far in this process."""
    return int(torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"])


@contextmanager
def eager_on_failure() -> Iterator[list[str]]:
    """Run the warm-up; if compiling fails (no C compiler, an unsupported op, a backend
    bug), note why, turn compilation off for this process and go on eager: a worker that
    serves slower is better than one that does not start. The list gets the reason."""
    failures: list[str] = []
    try:
        yield failures
    except Exception as exc:  # whatever inductor or a compiler raised
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        log.error("torch.compile failed, running eager instead: %s", reason)
        failures.append(reason)
        torch._dynamo.reset()
        torch._dynamo.config.disable = True
