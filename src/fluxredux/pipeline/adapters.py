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
from typing import Any

import torch
from diffusers import FluxPipeline

from fluxredux.errors import InvalidLora
from fluxredux.pipeline.protocol import AdapterFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterBudget:
    """How many adapters a worker keeps loaded, and how many bytes of them (files' sizes)."""

    count: int = 4
    bytes: int = 2 * 1024**3
    max_rank: int = 128  # with --compile: every slot's rank (a larger adapter is refused)
    # Whether the deployment offers adapters at all: without any, a compiled model gets
    # no hotswap slots (their memory and their share of each step would buy nothing).
    offered: bool = True


@dataclass
class _Loaded:
    adapter: str  # its name inside the model (PEFT's), ours: lora1, lora2, ...
    size: int  # bytes of its file: what the cache's budget counts


class AdapterCache:
    """The adapters loaded into ``pipe``'s transformer, by file (path, mtime, size: a
    replaced file is a new adapter)."""

    def __init__(self, pipe: FluxPipeline, budget: AdapterBudget, *, compiled: bool = False) -> None:
        self.pipe = pipe
        # A compiled transformer without hotswap slots (no adapter was offered when the
        # worker started): each adapter it loads recompiles it. Said once, with the way out.
        self._warn_recompiles = compiled
        self.max_count = budget.count
        self.max_bytes = budget.bytes
        self._loaded: OrderedDict[tuple[str, int, int], _Loaded] = OrderedDict()
        self._shown: dict[str, str] = {}  # adapter -> the request's name for it
        self._serial = 0
        self.loads = 0
        self.hits = 0
        self.load_seconds = 0.0

    def activate(self, files: Sequence[AdapterFile]) -> dict[str, str]:
        """Make exactly ``files`` active at their scales (none: the model's own layers
        only); each loaded unless cached. What happened to each, by name: "loaded" or "cached"."""
        if not files:
            # Any adapter loaded may be on (diffusers turns a new one on as it loads, and a
            # request can fail after one of its adapters loaded): off.
            if self._loaded:
                self.pipe.disable_lora()
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
        self.pipe.set_adapters(
            [self._loaded[key].adapter for key in keys], adapter_weights=[file.scale for file in files]
        )
        return outcome

    def _load(self, file: AdapterFile, key: tuple[str, int, int]) -> None:
        if self._warn_recompiles:
            self._warn_recompiles = False
            log.warning(
                "LoRA adapter %s on a compiled model without hotswap slots (no adapter was offered "
                "when this worker started): each adapter change recompiles the transformer; "
                "restart the worker to make its slots",
                file.name,
            )
        self._serial += 1
        adapter = f"lora{self._serial}"
        started = time.perf_counter()
        state = read_adapter(file)
        try:
            with _quiet_loading():
                self.pipe.load_lora_weights(state, adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            # Shapes of another model (another width, another block count): diffusers takes
            # the half-loaded adapter out again, and the model runs on as before.
            self._forget_partial(adapter)
            raise does_not_fit(file, exc) from None
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


def read_adapter(file: AdapterFile) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read by safetensors (never pickle), its transformer's only:
    handed to diffusers as a state dict, which converts the other trainers' formats (kohya,
    XLabs) from it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(file.path)
    except (SafetensorError, OSError) as exc:  # truncated, replaced, gone since it was checked
        raise InvalidLora(
            "lora_not_safetensors", f"'{file.name}' cannot be read ({exc})", index=file.index
        ) from None
    return {k: v for k, v in state.items() if not k.startswith(("text_encoder", "lora_te"))}


def does_not_fit(file: AdapterFile, exc: BaseException) -> InvalidLora:
    lines = str(exc).strip().splitlines()
    detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0] if lines else "")
    message = f"'{file.name}' does not fit this model's transformer ({detail[:240]})"
    return InvalidLora("lora_incompatible", message, index=file.index)


class HotswapSlots:
    """Adapters for a compiled transformer: a fixed set of slots (one per adapter a request
    may name), each a LoRA of rank ``max_rank`` on every linear layer of the transformer's
    blocks, made before the compile and never changed in shape: an adapter is copied into
    a slot (PEFT's hotswap: a smaller rank padded with zeros, layers it does not touch
    zeroed) and its scale written into the slot's scaling tensors in place, so neither a
    new adapter nor a new scale compiles anything. A slot not in use has scale 0: it adds
    exactly nothing. The cache here keeps adapters' tensors in memory (CPU), so that one
    used lately is copied in without reading its file again.

    The price: the slots' weights (rank x (inputs + outputs) per layer and slot: about 1.4 GB
    per slot for FLUX.1 at rank 128 in bf16) and their share of every step, with or without
    adapters. An adapter that does not fit (another model's shapes, a layer outside the
    blocks) is checked against the slots before anything is copied, and refused.
    """

    def __init__(self, pipe: FluxPipeline, budget: AdapterBudget, slots: int) -> None:
        self.pipe = pipe
        self.budget = budget
        self.slots = [f"slot{i}" for i in range(slots)]
        self._in_slot: list[tuple[str, int, int] | None] = [None] * slots
        self._shown: list[str | None] = [None] * slots
        self._states: OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]] = OrderedDict()
        # Each slot's LoRA layers with their scaling as the adapter in it set it (alpha / rank):
        # a request's scale multiplies that.
        self._bases: list[list[tuple[Any, float]]] = [[] for _ in range(slots)]
        self._layers: list[Any] = []  # the transformer's LoRA layers, once the slots are made
        self.loads = 0
        self.hits = 0
        self.load_seconds = 0.0

    @classmethod
    def prepare(cls, pipe: FluxPipeline, budget: AdapterBudget, slots: int) -> HotswapSlots:
        """Make the slots; before the transformer compiles, and before any adapter loads."""
        pipe.enable_lora_hotswap(target_rank=budget.max_rank)
        made = cls(pipe, budget, slots)
        for index in range(slots):
            made._build_slot(index)
        made._layers[:] = made._lora_layers()  # fixed from here on: the slots never change shape
        return made

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.pipe.transformer.modules() if isinstance(m, LoraLayer)]

    def _build_slot(self, index: int) -> None:
        transformer, slot, rank = self.pipe.transformer, self.slots[index], self.budget.max_rank
        zeros: dict[str, torch.Tensor] = {}
        for name, module in transformer.named_modules():
            if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                continue
            if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
                name = name.removesuffix(".base_layer")  # a layer that has adapters already
                zeros[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
                zeros[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
        with _quiet_loading():
            self.pipe.load_lora_weights(zeros, adapter_name=slot)
        for layer in self._lora_layers():
            if slot not in layer.scaling:
                continue
            # A tensor, not a float: a float is a constant the compiled code checks (a new
            # value would compile again); a tensor's value is read as it runs. (PEFT makes
            # tensors of the first adapter's only, as it prepares the model for hotswapping.)
            if isinstance(layer.scaling[slot], torch.Tensor):
                layer.scaling[slot].fill_(0.0)
            else:
                weight = layer.lora_A[slot].weight
                layer.scaling[slot] = torch.tensor(0.0, device=weight.device, dtype=weight.dtype)
            # Every slot active, always: the compiled graph has them all.
            layer.set_adapter([name for name in self.slots if name in layer.scaling])
        self._in_slot[index], self._shown[index], self._bases[index] = None, None, []

    def activate(self, files: Sequence[AdapterFile]) -> dict[str, str]:
        """Each slot gets the request's adapter of its place (copied in unless it is there
        already) at its scale; the slots past the request's adapters, scale 0."""
        outcome: dict[str, str] = {}
        for index in range(len(self.slots)):
            file = files[index] if index < len(files) else None
            if file is None:
                self._scale(index, 0.0)
                continue
            key = _identity(file)
            if self._in_slot[index] == key:
                self.hits += 1
                outcome[file.name] = "cached"
            else:
                outcome[file.name] = self._swap_in(index, file, key)
            self._scale(index, file.scale)
        return outcome

    def _swap_in(self, index: int, file: AdapterFile, key: tuple[str, int, int]) -> str:
        started = time.perf_counter()
        state = self._states.get(key)
        outcome = "loaded" if state is None else "cached"
        if state is None:
            state = read_adapter(file)
            self._remember(key, state)
        else:
            self._states.move_to_end(key)
        slot = self.slots[index]
        try:
            with _quiet_loading():
                # In diffusers' own format first (it converts kohya's, XLabs'...), to check
                # every tensor against its slot before anything is copied: a hotswap that
                # fails halfway leaves the slot half-written, or in another shape.
                converted = self.pipe.lora_state_dict(dict(state))
                self._check_fits(converted)
                self.pipe.load_lora_weights(converted, adapter_name=slot, hotswap=True)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            self._states.pop(key, None)
            self._clear_slot(index)
            raise does_not_fit(file, exc) from None
        self._in_slot[index], self._shown[index] = key, file.name
        self._bases[index] = [
            (layer, float(layer.scaling[slot])) for layer in self._layers if slot in layer.scaling
        ]
        if outcome == "loaded":
            self.loads += 1
        else:
            self.hits += 1
        self.load_seconds += time.perf_counter() - started
        return outcome

    def _check_fits(self, state: dict[str, torch.Tensor]) -> None:
        """ValueError naming the first tensor that has no place in the slots: a layer
        outside the blocks, another width, a rank above the slots'."""
        from peft.tuners.lora import LoraLayer

        transformer, rank = self.pipe.transformer, self.budget.max_rank
        for key, tensor in state.items():
            name, _, part = key.removeprefix("transformer.").rpartition(".lora_")
            try:
                layer = transformer.get_submodule(name)
            except AttributeError:
                layer = None
            if not isinstance(layer, LoraLayer) or self.slots[0] not in layer.lora_A:
                raise ValueError(
                    f"with --compile, adapters may change the transformer's blocks only, not {key}"
                )
            base = layer.get_base_layer()
            if part == "A.weight":
                fits = tensor.shape[1] == base.in_features and tensor.shape[0] <= rank
            elif part == "B.weight":
                fits = tensor.shape[0] == base.out_features and tensor.shape[1] <= rank
            else:
                fits = False
            if not fits:
                raise ValueError(
                    f"size mismatch for {key}: {tuple(tensor.shape)} against this model's layer "
                    f"({base.in_features} -> {base.out_features}, rank at most {rank})"
                )

    def _clear_slot(self, index: int) -> None:
        """The slot's weights zeroed in place and its scale 0: as if it never held one."""
        slot = self.slots[index]
        with torch.no_grad():
            for layer in self._layers:
                if slot in layer.lora_A:
                    layer.lora_A[slot].weight.zero_()
                    layer.lora_B[slot].weight.zero_()
                    layer.scaling[slot].fill_(0.0)
        self._in_slot[index], self._shown[index], self._bases[index] = None, None, []

    def _remember(self, key: tuple[str, int, int], state: dict[str, torch.Tensor]) -> None:
        while self._states and (
            len(self._states) >= self.budget.count
            or sum(k[2] for k in self._states) + key[2] > self.budget.bytes
        ):
            self._states.popitem(last=False)
        self._states[key] = state

    def _scale(self, index: int, scale: float) -> None:
        slot = self.slots[index]
        if self._in_slot[index] is None or scale == 0:
            for layer in self._layers:
                if slot in layer.scaling:
                    layer.scaling[slot].fill_(0.0)
            return
        for layer, base in self._bases[index]:
            layer.scaling[slot].fill_(base * scale)

    def counters(self) -> dict[str, object]:
        return {
            "loaded": list(dict.fromkeys(name for name in self._shown if name is not None)),
            "bytes": sum(key[2] for key in self._states),
            "loads": self.loads,
            "hits": self.hits,
            "load_seconds": round(self.load_seconds, 3),
        }


Adapters = AdapterCache | HotswapSlots
