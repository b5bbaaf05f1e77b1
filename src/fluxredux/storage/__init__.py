"""Files on local disk: uploaded reference images and generated outputs."""

from fluxredux.storage.files import FileStore

__all__ = ["FileStore"]
