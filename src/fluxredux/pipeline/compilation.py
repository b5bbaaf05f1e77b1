"""torch.compile for the model, compiled once at worker start, never per request.

Requests come in 22 table sizes (more with match_input) and 1-4 outputs; compiled for
static shapes that would be dozens of compiles, each of them stalling a request. Compiled
with dynamic shapes instead, one graph covers every size and batch, except where torch
specialises: a batch of 1 is its own graph (sizes of 1 always are), and so is the
presence of an attention bias (a tensor or None). ``speed.warm_up`` runs each of those few
graphs once, at worker start, with its progress logged; afterwards no request compiles
(a test counts the graphs over mixed requests).

The compiled code is cached on disk (inductor's FX graph cache) under the data dir, so a
restarted worker recompiles from cache in a fraction of the first time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._dynamo

from fluxredux.config import CompileMode
from fluxredux.errors import first_line

log = logging.getLogger(__name__)


def use_compile_cache(folder: Path) -> None:
    """Keep inductor's compiled code in ``folder``, so restarts reuse it. (Inductor reads
    its cache location from the environment only; this process is the worker, which owns
    its environment.)"""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    torch._inductor.config.fx_graph_cache = True


def compile_modules(transformer: torch.nn.Module, image_encoder: torch.nn.Module, mode: CompileMode) -> None:
    """Mark the modules ``mode`` names for compilation (in place: the pipeline keeps the
    same objects). Nothing compiles until their first call: see ``speed.warm_up``.

    The transformer with dynamic shapes (sizes, batches, sequence lengths vary). With
    "all", the image encoder too, with static shapes: its input is always one image of
    the encoder's size. The VAE decoder stays eager: under dynamic shapes its
    convolutions guard on the latent's size and would compile again under requests."""
    if mode == "none":
        return
    # Not fullgraph=True: with it, a compile that failed cannot fall back to eager (see
    # eager_on_failure). The warm-up's graph count shows a graph break all the same.
    transformer.compile(dynamic=True)
    if mode == "all":
        image_encoder.compile(dynamic=False)


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
    serves slower is better than one that does not start. The list gets the reason.
    Anything else (out of memory, a kernel error) is not the compiler's: it goes up."""
    failures: list[str] = []
    try:
        yield failures
    except torch._dynamo.exc.TorchDynamoException as exc:  # inductor's errors too
        reason = first_line(exc)
        log.error("torch.compile failed, running eager instead: %s", reason)
        failures.append(reason)
        torch._dynamo.reset()
        torch._dynamo.config.disable = True
