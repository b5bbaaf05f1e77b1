"""Style adapters (LoRA) on the transformer: loaded through diffusers' PEFT integration
under names of our own, several active at once with their scales (``set_adapters``), and
kept loaded in a cache bounded by count and bytes, the least recently used unloaded first.

A generation without adapters runs the transformer's own layers only (``disable_lora``):
the same bytes as a model that never loaded one. A scale of 0 adds exactly nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from diffusers import FluxPipeline

from fluxredux.errors import InvalidLora
from fluxredux.pipeline.protocol import AdapterFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterBudget:
    """How many adapters a worker keeps loaded, and how many bytes of them (files' sizes)."""

    count: int = 4
    bytes: int = 2 * 1024**3


@dataclass
class _Loaded:
    adapter: str  # its name inside the model (PEFT's), ours: lora1, lora2, ...
    size: int  # bytes of its file: what the cache's budget counts


class AdapterCache:
    """The adapters loaded into ``pipe``'s transformer, by file (path, mtime, size: a
    replaced file is a new adapter)."""

    def __init__(self, pipe: FluxPipeline, budget: AdapterBudget) -> None:
        self.pipe = pipe
        self.max_count = budget.count
        self.max_bytes = budget.bytes
        self._loaded: OrderedDict[tuple[str, int, int], _Loaded] = OrderedDict()
        self._shown: dict[str, str] = {}  # adapter -> the request's name for it
        self._serial = 0
        self._enabled = False  # whether the adapters' layers take part now
        self.loads = 0
        self.hits = 0
        self.load_seconds = 0.0

    def activate(self, files: Sequence[AdapterFile]) -> dict[str, str]:
        """Make exactly ``files`` active at their scales (none: the model's own layers
        only); each loaded unless cached. What happened to each, by name: "loaded" or "cached"."""
        if not files:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return {}
        keys = [_identity(file) for file in files]
        outcome: dict[str, str] = {}
        for file, key in zip(files, keys, strict=True):
            if key in self._loaded:
                self._loaded.move_to_end(key)
                self.hits += 1
                outcome[file.name] = "cached"
            else:
                self._make_room(key[2], keep=set(keys))
                self._load(file, key)
                outcome[file.name] = "loaded"
        self.pipe.enable_lora()
        self._enabled = True
        self.pipe.set_adapters(
            [self._loaded[key].adapter for key in keys], adapter_weights=[file.scale for file in files]
        )
        return outcome

    def _load(self, file: AdapterFile, key: tuple[str, int, int]) -> None:
        from safetensors.torch import load_file

        self._serial += 1
        adapter = f"lora{self._serial}"
        started = time.perf_counter()
        # Read by safetensors (never pickle), then handed over as a state dict: diffusers
        # converts the other trainers' formats (kohya, XLabs) from it.
        state = load_file(file.path)
        state = {k: v for k, v in state.items() if not k.startswith(("text_encoder", "lora_te"))}
        try:
            with _quiet_loading():
                self.pipe.load_lora_weights(state, adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            # Shapes of another model (another width, another block count): diffusers takes
            # the half-loaded adapter out again, and the model runs on as before.
            self._forget_partial(adapter)
            first = str(exc).strip().splitlines()
            detail = next(
                (line.strip() for line in first if "size mismatch" in line), first[0] if first else ""
            )
            raise InvalidLora(
                "lora_incompatible",
                f"'{file.name}' does not fit this model's transformer ({detail[:240]})",
                index=file.index,
            ) from None
        seconds = time.perf_counter() - started
        self.loads += 1
        self.load_seconds += seconds
        self._loaded[key] = _Loaded(adapter, key[2])
        self._shown[adapter] = file.name
        log.info("loaded LoRA adapter %s (%.0f KiB) in %.2f s", file.name, key[2] / 1024, seconds)

    def _forget_partial(self, adapter: str) -> None:
        adapters = self.pipe.get_list_adapters()
        if any(adapter in names for names in adapters.values()):
            self.pipe.delete_adapters([adapter])

    def _make_room(self, size: int, keep: set[tuple[str, int, int]]) -> None:
        """Unload the least recently used adapters until one more of ``size`` bytes fits
        (never one the coming generation needs)."""
        for key in list(self._loaded):
            used = sum(entry.size for entry in self._loaded.values())
            if len(self._loaded) < self.max_count and used + size <= self.max_bytes:
                return
            if key in keep:
                continue
            entry = self._loaded.pop(key)
            self.pipe.delete_adapters([entry.adapter])
            log.info("unloaded LoRA adapter %s (least recently used)", self._shown.pop(entry.adapter))

    def counters(self) -> dict[str, object]:
        """For the registry (/health, /metrics): what is loaded, and the loads and hits so far."""
        return {
            "loaded": [self._shown[entry.adapter] for entry in self._loaded.values()],
            "bytes": sum(entry.size for entry in self._loaded.values()),
            "loads": self.loads,
            "hits": self.hits,
            "load_seconds": round(self.load_seconds, 3),
        }


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without the warnings every load gives for nothing: that the pipeline has no text
    encoder to load into (ours never does: transformer LoRAs only), and PEFT's that a
    model with an adapter gets another (the cache's very purpose)."""
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_log.level
    lora_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        lora_log.setLevel(level)


def _identity(file: AdapterFile) -> tuple[str, int, int]:
    stat = os.stat(file.path)
    return (os.path.realpath(file.path), stat.st_mtime_ns, stat.st_size)
