"""The worker's cache of the Redux prior's output, so a repeated reference skips SigLIP.

What the key is. The hash (SHA-256) of the pixel tensor SigLIP's processor makes of the
reference: (1, 3, 384, 384) float32, 1.8 MB. That tensor is exactly what the encoder sees,
so it decides the output completely, and the crop mode is in it already (the predictor
crops, pads or squashes before the model is asked: ``images.square_reference``). Two crop
modes that give the same pixels share an entry, rightly. Each model has a cache of its
own, so the key need not name the weights, dtype or device. Measured on a 2-core CPU: the
hash takes 1.0 ms whatever the reference's size, where hashing the decoded pixels of a
6000x4000 reference would take ~90 ms (preprocessing it takes ~300 ms, paid with or
without a cache); SigLIP so400m + the Redux embedder (bf16) take ~2.9 s there, a hit
~12 ms for a 768x512 reference. A cryptographic hash, not a faster non-cryptographic one:
on a shared server a reference crafted to collide with someone else's would be
conditioned on their image.

What is cached. The Redux image tokens (1, 729, 4096 for the real model: 5.7 MiB in bf16),
on the model's device, where they are used: a hit is only a concatenation after the zero
text tokens, with no copy between devices. Not the zero text part (it is rebuilt, free),
not a prompt's text (put in its place afterwards, on a hit as on a miss: ``with_text``)
and not the SigLIP hidden states (3.5x smaller, but a hit would still run the embedder).
The bytes each entry holds count against the bound; the least recently used go first.

The counters (hits, misses) are cumulative for the life of the model; the worker reports
them in its registry entry, from where ``/metrics`` shows them (see worker/process.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from PIL import Image

from fluxredux.pipeline.components import ReduxComponents
from fluxredux.pipeline.conditioning import (
    TEXT_SEQUENCE_LENGTH,
    Conditioning,
    after_zero_text,
    encoder_pixels,
    redux_tokens,
)

MIB = 2**20


class ConditioningCache:
    """A thread-safe LRU of Redux image tokens, bounded by the bytes they hold.

    Thread-safe for lookups and insertions; the encoder runs outside the lock, so two
    threads missing the same key at once both compute it (the same tensor; the second
    insert replaces the first). A worker runs one prediction at a time anyway."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @classmethod
    def from_megabytes(cls, megabytes: int) -> ConditioningCache | None:
        """The cache the setting asks for (MiB); None for 0: no cache at all, no counters."""
        return cls(megabytes * MIB) if megabytes > 0 else None

    def get(self, key: bytes) -> torch.Tensor | None:
        """The tokens cached under ``key`` (now the most recently used), or None; counted."""
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return tokens

    def put(self, key: bytes, tokens: torch.Tensor) -> None:
        """Keep ``tokens`` under ``key``, evicting the least recently used entries to stay
        within the bound. An entry larger than the whole bound is not kept."""
        size = entry_bytes(tokens)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= entry_bytes(previous)
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= entry_bytes(evicted)
            self._entries[key] = tokens
            self._bytes += size

    def counters(self) -> dict[str, int]:
        """Cumulative lookups that hit and missed: what the worker reports."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses}

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries


def entry_bytes(tokens: torch.Tensor) -> int:
    # The whole storage, not the view's elements: a slice would keep all of it alive.
    return int(tokens.untyped_storage().nbytes())


def pixels_key(pixels: torch.Tensor) -> bytes:
    """SHA-256 of the preprocessed pixels (shape, dtype and values): the cache key."""
    digest = hashlib.sha256(f"{tuple(pixels.shape)}:{pixels.dtype}:".encode())
    digest.update(pixels.detach().cpu().contiguous().numpy().data)
    return digest.digest()


def cached_redux_conditioning(
    image: Image.Image,
    parts: ReduxComponents,
    *,
    cache: ConditioningCache | None,
    device: torch.device,
    text_sequence_length: int = TEXT_SEQUENCE_LENGTH,
) -> Conditioning:
    """``redux_conditioning`` of ``parts``' prior, sized for their transformer, with the Redux
    image tokens looked up in ``cache`` first: the same pieces in the same order, only the
    encoder and embedder skipped on a hit. Without a cache (``None``: turned off), exactly
    ``redux_conditioning``."""
    pixels = encoder_pixels(image, parts.feature_extractor)
    key = pixels_key(pixels) if cache is not None else b""  # on the CPU tensor, before the copy
    tokens = cache.get(key) if cache is not None else None
    if tokens is None:
        with torch.inference_mode():  # a cached tensor must never hold an autograd graph
            tokens = redux_tokens(
                pixels, image_encoder=parts.image_encoder, image_embedder=parts.image_embedder, device=device
            )
        if cache is not None:
            cache.put(key, tokens)
    config = parts.pipe.transformer.config
    return after_zero_text(
        tokens,
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        text_sequence_length=text_sequence_length,
    )
