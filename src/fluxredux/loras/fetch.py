"""A worker's side of the catalog: the files of a request's adapters, checked, and
fetched from the Hugging Face Hub where the operator allows it. Torch-free."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from fluxredux.errors import InvalidLora
from fluxredux.loras.catalog import SUFFIX, HubRef, LoraCatalog, normalised
from fluxredux.pipeline.protocol import AdapterFile
from fluxredux.schema import LoraUse

log = logging.getLogger(__name__)


class AdapterFiles:
    """Names to checked files, for the model. Everything the API checked at create time
    is checked again here: the file may have changed or gone since, and a final inherits
    its draft's adapters without a new check."""

    def __init__(self, catalog: LoraCatalog) -> None:
        self.catalog = catalog

    def files(self, uses: Sequence[LoraUse]) -> tuple[AdapterFile, ...]:
        files = []
        seen: set[str] = set()
        for index, (use, found) in enumerate(zip(uses, self.catalog.resolve(uses), strict=True)):
            name = normalised(use.name)
            if isinstance(found, HubRef):
                path = self._fetched(found, index)
                self.catalog.check_file(path, index, name)
            else:
                path = found
            real = os.path.realpath(path)
            if real in seen:  # two names for one file (a repo's only file, a link): once only
                message = f"'{name}' is the same file as another adapter of the request; give it once"
                raise InvalidLora("lora_twice", message, index=index)
            seen.add(real)
            files.append(AdapterFile(name=name, path=str(path), scale=use.scale, index=index))
        return tuple(files)

    def _fetched(self, ref: HubRef, index: int) -> Path:
        """The hub file, from the local Hugging Face cache or downloaded into it once.
        Only safetensors files are ever asked for (the name's pattern says so)."""
        import httpx
        from huggingface_hub import HfApi, hf_hub_download, list_repo_files
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        name = f"{ref.repo_id}/{ref.filename}" if ref.filename else ref.repo_id
        try:
            filename = ref.filename
            if filename is None:  # the repo's only adapter file
                found = [f for f in list_repo_files(ref.repo_id) if f.endswith(SUFFIX)]
                if len(found) != 1:
                    raise InvalidLora(
                        "lora_not_found",
                        f"'{name}' holds {len(found)} safetensors files; "
                        f"name one: {ref.repo_id}/FILE.safetensors",
                        index=index,
                    )
                filename = found[0]
            # Its size first, from the Hub's listing: a caller may name any file of an allowed
            # owner, and one larger than the cache would fill the disk for nothing.
            found_files = HfApi().get_paths_info(ref.repo_id, [filename])
            size = getattr(found_files[0], "size", None) if found_files else None
            if size is None:
                raise InvalidLora("lora_not_found", f"'{name}': no such file on the Hub", index=index)
            if size > self.catalog.max_bytes:
                message = (
                    f"'{name}' ({size / 2**20:.0f} MiB) is larger than a worker's adapter cache "
                    f"({self.catalog.max_bytes / 2**20:.0f} MiB; --lora-cache-mb)"
                )
                raise InvalidLora("lora_too_large", message, index=index)
            log.info("fetching LoRA adapter %s/%s from the Hugging Face Hub", ref.repo_id, filename)
            return Path(hf_hub_download(ref.repo_id, filename))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, httpx.HTTPError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InvalidLora(
                "lora_not_found", f"'{name}' could not be fetched from the Hub ({first})", index=index
            ) from exc
