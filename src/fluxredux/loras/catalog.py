"""The LoRA adapters callers may name: the operator's files in the LoRA folder, and the
Hugging Face repos the operator allows (``--lora-sources``).

Torch-free: the API checks a request's adapters against it at create time (a file's
header, never its tensors: names, shapes), the worker resolves names to files with it,
and the CLI lists and adds adapters. A caller never gives a URL: downloading a caller's
file onto a GPU machine is an abuse path, so only what the operator put or allowed is used.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fluxredux.config import Settings
from fluxredux.errors import InvalidLora
from fluxredux.schema import LoraUse

SUFFIX = ".safetensors"
# A local adapter's name: its file's name without the suffix; no folders, no dot first.
LOCAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A Hugging Face adapter's name: owner/repo, or owner/repo/path/to/file.safetensors.
HUB_NAME = re.compile(
    r"^(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,95})/(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95})"
    r"(?:/(?P<file>(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors))?$"
)
# Files that can run code when loaded (pickle): named, refused, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a rank-128 FLUX LoRA's header is ~100 KB

# Tensor names of a FLUX.1 transformer LoRA, in the formats diffusers loads: its own and
# PEFT's (transformer_blocks.N...lora_A), kohya's (lora_unet_double_blocks_N_...), and
# Black Forest Labs' / XLabs' (double_blocks.N...). Text-encoder tensors some trainers add
# (CLIP's) are allowed and not loaded: the worker loads transformer LoRAs only.
_FLUX_TRANSFORMER = re.compile(
    r"^(?:(?:base_model\.model|transformer|diffusion_model)\.)?"
    r"(?:transformer_blocks|single_transformer_blocks|double_blocks|single_blocks|x_embedder|"
    r"context_embedder|time_text_embed|norm_out|proj_out|img_in|txt_in|time_in|vector_in|final_layer)[._]"
    r"|^lora_unet_(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|final_layer)_"
)
_TEXT_ENCODER = re.compile(r"^(?:text_encoder(?:_2)?\.|lora_te[12]?_)")
# The down projection of each pair: its first dimension is the adapter's rank.
_DOWN = re.compile(r"(?:lora_A|lora_down|lora\.down|\.down)(?:\.[A-Za-z0-9_]+)?\.weight$")

Source = Literal["local", "hub"]


@dataclass(frozen=True)
class LoraHeader:
    """What a LoRA file's header says, read without its tensors."""

    rank: int
    tensors: int


@dataclass(frozen=True)
class LoraEntry:
    """One adapter the catalog lists: usable (``problem`` None) or not, and why."""

    name: str
    source: Source
    size: int | None = None  # bytes of its file; None for a hub repo not downloaded
    rank: int | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        listed: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "size": self.size,
            "rank": self.rank,
        }
        if self.problem is not None:
            listed["problem"] = self.problem
        return listed


@dataclass(frozen=True)
class HubRef:
    """An allowed Hugging Face adapter: the repo, and the file in it (None: its only one)."""

    repo_id: str
    filename: str | None


class LoraFileProblem(ValueError):
    """A file that is not a usable FLUX transformer LoRA; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor names, dtypes, shapes), checked for shape.

    By hand, not with the safetensors package: the API process reads 8 bytes and a small
    JSON document and needs no tensor framework for it; and a file that is anything else
    (a pickle renamed .safetensors, a zip, a truncated download) fails here, never loaded."""
    not_safetensors = LoraFileProblem(
        "lora_not_safetensors", "not a safetensors file (only safetensors adapters are loaded, never pickle)"
    )
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise not_safetensors
        length = int.from_bytes(head, "little")
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise not_safetensors
        raw = file.read(length)
    if not raw.startswith(b"{"):
        raise not_safetensors
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    # Every tensor's bytes inside the file: a truncated download is refused here, not
    # found out by the worker's load.
    ends = [
        spec.get("data_offsets", [0, 0])[-1]
        for k, spec in header.items()
        if k != "__metadata__" and isinstance(spec, dict)
    ]
    if any(not isinstance(end, int) or end > size - 8 - length for end in ends):
        raise LoraFileProblem(
            "lora_not_safetensors", "a truncated safetensors file (its tensors end past the file)"
        )
    return header


def inspect_header(header: dict[str, Any]) -> LoraHeader:
    """The rank of a FLUX transformer LoRA, or LoraFileProblem saying what it is not."""
    tensors = {name: spec for name, spec in header.items() if name != "__metadata__"}
    if not tensors or not all(
        isinstance(spec, dict) and isinstance(spec.get("shape"), list) for spec in tensors.values()
    ):
        raise LoraFileProblem("lora_not_safetensors", "not a safetensors file of tensors")
    foreign = [name for name in tensors if not (_FLUX_TRANSFORMER.match(name) or _TEXT_ENCODER.match(name))]
    if foreign or not any(_FLUX_TRANSFORMER.match(name) for name in tensors):
        example = (foreign or sorted(tensors))[0]
        raise LoraFileProblem(
            "lora_wrong_model",
            f"not a LoRA of the FLUX.1 transformer (its tensors are named like '{example[:120]}')",
        )
    ranks = [spec["shape"][0] for name, spec in tensors.items() if _DOWN.search(name) and spec["shape"]]
    if not ranks or not all(isinstance(rank, int) and rank > 0 for rank in ranks):
        raise LoraFileProblem("lora_wrong_model", "no LoRA down-projections (lora_A / lora_down) in it")
    return LoraHeader(rank=max(ranks), tensors=len(tensors))


@functools.lru_cache(maxsize=512)
def _inspected(path: str, mtime_ns: int, size: int) -> LoraHeader | LoraFileProblem:
    # Keyed by the file's identity as stat sees it: a replaced file is read again. A bad
    # file's verdict is kept too: naming it again must not parse its header again.
    try:
        return inspect_header(read_header(Path(path)))
    except LoraFileProblem as exc:
        return exc


def inspect_file(path: Path) -> LoraHeader:
    """``inspect_header`` of ``path``, remembered while the file stays the same."""
    stat = path.stat()
    found = _inspected(str(path), stat.st_mtime_ns, stat.st_size)
    if isinstance(found, LoraFileProblem):
        raise LoraFileProblem(found.code, str(found))
    return found


class LoraCatalog:
    """The adapters of one deployment: ``folder``'s files and the ``hub`` repos allowed."""

    def __init__(
        self, folder: Path, hub: Sequence[tuple[str, str]] = (), *, max_rank: int, max_bytes: int
    ) -> None:
        self.folder = folder
        self.hub = list(hub)
        self.max_rank = max_rank
        self.max_bytes = max_bytes  # a worker's cache could never hold a larger one

    @classmethod
    def from_settings(cls, settings: Settings) -> LoraCatalog:
        return cls(
            settings.loras_dir,
            settings.lora_hub_sources,
            max_rank=settings.lora_max_rank,
            max_bytes=settings.lora_cache_mb * 1024 * 1024,
        )

    # -- what there is ------------------------------------------------------------------

    def entries(self) -> list[LoraEntry]:
        """Every adapter file in the folder, by name, each with its problem if it has one;
        then each allowed hub pattern (its rank and size are known once a worker fetched it)."""
        listed = []
        files = sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []
        for path in files:
            name = path.name.removesuffix(SUFFIX)
            if not LOCAL_NAME.match(name) or not path.is_file():
                continue
            try:
                size = path.stat().st_size
                header = self._checked(path)
            except LoraFileProblem as exc:
                listed.append(LoraEntry(name, "local", size=size, problem=str(exc)))
                continue
            except OSError as exc:  # unreadable, or gone since the folder was read
                listed.append(LoraEntry(name, "local", problem=f"cannot be read ({exc.strerror or exc})"))
                continue
            listed.append(LoraEntry(name, "local", size=size, rank=header.rank))
        for owner, repo in self.hub:
            listed.append(LoraEntry(f"{owner}/{repo}", "hub"))
        return listed

    def usable(self) -> list[LoraEntry]:
        return [entry for entry in self.entries() if entry.problem is None]

    # -- a request's adapters -----------------------------------------------------------

    def check(self, choices: Sequence[LoraUse]) -> None:
        """Every adapter a request names is one this deployment offers: InvalidLora naming
        the first that is not. Blocking (reads file headers): in the create's thread."""
        self.resolve(choices)

    def resolve(self, choices: Sequence[LoraUse]) -> list[Path | HubRef]:
        """Each adapter's checked local file, or the hub file it stands for (the worker's to
        fetch and check); InvalidLora naming the first that is not offered. Local files are
        checked fully (format, FLUX keys, rank, size)."""
        seen: set[str] = set()
        found: list[Path | HubRef] = []
        for index, choice in enumerate(choices):
            name = normalised(choice.name)
            if name in seen:
                raise InvalidLora(
                    "lora_twice", f"'{name}' is named twice; give it once with the scale wanted", index=index
                )
            seen.add(name)
            found.append(self.hub_ref(name, index) if "/" in name else self.local_file(name, index))
        return found

    def local_file(self, name: str, index: int) -> Path:
        """The checked file of local adapter ``name``."""
        name = normalised(name)
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidLora(
                "lora_not_safetensors",
                f"'{name}': only safetensors adapters are loaded (pickle files can run code)",
                index=index,
            )
        path = self.folder / f"{name}{SUFFIX}"
        if not LOCAL_NAME.match(name) or not path.is_file():
            raise InvalidLora(
                "lora_not_found",
                f"no LoRA adapter named '{name[:128]}' (GET /v1/loras lists them)",
                index=index,
            )
        self.check_file(path, index, name)
        return path

    def hub_ref(self, name: str, index: int) -> HubRef:
        """The Hugging Face file adapter ``name`` stands for, if the operator allows its repo."""
        match = HUB_NAME.match(normalised(name))
        if match is None:
            raise InvalidLora(
                "lora_not_found",
                f"'{name[:128]}' is neither a local adapter's name nor owner/repo[/file.safetensors]",
                index=index,
            )
        owner, repo = match["owner"], match["repo"]
        if not any(owner == allowed and pattern in ("*", repo) for allowed, pattern in self.hub):
            raise InvalidLora(
                "lora_source_not_allowed",
                f"'{owner}/{repo}' is not an allowed source of adapters on this server (its operator "
                "allows Hugging Face repos with --lora-sources hf:owner/*)",
                index=index,
            )
        return HubRef(f"{owner}/{repo}", match["file"])

    def check_file(self, path: Path, index: int, name: str) -> LoraHeader:
        """``path`` as a usable adapter (a fetched hub file, or a local one), or InvalidLora."""
        try:
            return self._checked(path)
        except LoraFileProblem as exc:
            raise InvalidLora(exc.code, f"'{name}': {exc}", index=index) from None
        except OSError as exc:  # unreadable, or gone since it was listed
            message = f"'{name}' cannot be read ({exc.strerror or exc})"
            raise InvalidLora("lora_not_found", message, index=index) from None

    def _checked(self, path: Path) -> LoraHeader:
        header = inspect_file(path)
        if header.rank > self.max_rank:
            raise LoraFileProblem(
                "lora_rank_too_large",
                f"its rank ({header.rank}) is above this server's largest ({self.max_rank}; --lora-max-rank)",
            )
        if path.stat().st_size > self.max_bytes:
            raise LoraFileProblem(
                "lora_too_large",
                f"its file ({path.stat().st_size / 2**20:.0f} MiB) is larger than a worker's adapter cache "
                f"({self.max_bytes / 2**20:.0f} MiB; --lora-cache-mb)",
            )
        return header

    # -- the operator's ----------------------------------------------------------------

    def add(self, source: Path, name: str | None = None) -> LoraEntry:
        """Copy adapter file ``source`` into the folder as ``name`` (default: its own name),
        after checking it as a request would. Written under a temporary name and renamed:
        a worker never sees half a file. ValueError saying what is wrong."""
        name = normalised(name or source.name)
        if not LOCAL_NAME.match(name):
            raise ValueError(f"'{name}' is not a usable name (letters, digits, . _ -; no folders)")
        if source.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{source}: only safetensors adapters are loaded (pickle files can run code)")
        header = self._checked(source)  # LoraFileProblem is a ValueError: the caller shows it
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{name}{SUFFIX}"
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".adding-", suffix=SUFFIX)
        os.close(handle)
        try:
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return LoraEntry(name, "local", size=target.stat().st_size, rank=header.rank)


def normalised(name: str) -> str:
    """A name as given, or with the file suffix a caller may add: ``style.safetensors`` is ``style``."""
    name = name.strip()
    return name.removesuffix(SUFFIX) if "/" not in name else name
