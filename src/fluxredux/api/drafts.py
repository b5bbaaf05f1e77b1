"""Finals from drafts (``upscale_from``): at create, the draft is found among the caller's
own predictions, and the final's input made from it.

A final is conditioned as its draft was (its references, their weights, prompt, strength
and crop) unless the request gives those fields, and keeps the draft's seed unless it
gives one; its size choice is recorded explicitly (scale 2 by default). The draft's
reference files and the chosen output are *copied* for the final, in that order: the
final must not lose its inputs when the draft is deleted or expires while it waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxredux.errors import ImageFileNotFound, InvalidInput, NotFound
from fluxredux.jobs.job import Job, Status
from fluxredux.jobs.store import JobStore
from fluxredux.schema import PredictionInput

FIELD = "input.upscale_from"
# What a final takes from its draft unless the request gives it.
# What a final takes from its draft unless the request gives it: what conditioned the
# draft, its style adapters included (a final refines the draft's look, not another one).
_CONDITIONING = ("redux_image", "redux_images", "prompt", "redux_strength", "redux_image_crop", "loras")


@dataclass(frozen=True)
class Final:
    input: PredictionInput  # the final's, as it will be recorded
    # The blobs to copy for it: the draft's references (unless the request gives its own,
    # stored as any create's are), then the draft's chosen output, always last.
    files: list[str]
    own_references: bool


def _refused(message: str, field: str = FIELD) -> InvalidInput:
    return InvalidInput(
        f"{field}: {message}",
        fields=[{"field": field, "message": message, "type": "value_error"}],
        field=field,
    )


def draft_of(store: JobStore, owner: str, inputs: PredictionInput) -> Job:
    """The finished draft ``inputs.upscale_from`` names, of ``owner``'s own. Another key's
    is as absent as an unknown one (404), as reading it would be. Blocking: in a thread."""
    source = inputs.upscale_from
    assert source is not None
    draft = store.get(source.prediction)
    if draft is None or draft.owner != owner:
        raise NotFound(f"{FIELD}: no prediction '{source.prediction}'", id=source.prediction, field=FIELD)
    if draft.status != Status.SUCCEEDED:
        raise _refused(
            f"prediction '{draft.id}' is {draft.status.value}: only a finished one can be upscaled"
        )
    if source.index >= len(draft.output):
        raise _refused(
            f"prediction '{draft.id}' has {len(draft.output)} output(s); index {source.index} is not one",
            f"{FIELD}.index",
        )
    return draft


def final_from(draft: Job, inputs: PredictionInput) -> Final:
    """The final's input and the files it needs, from its ``draft``."""
    source = inputs.upscale_from
    assert source is not None
    drafted = PredictionInput.from_record(draft.input)
    given = inputs.model_fields_set
    taken = {name: getattr(drafted, name) for name in _CONDITIONING}
    if given & {"redux_image", "redux_images"}:  # references given: none of the draft's
        taken.pop("redux_image")
        taken.pop("redux_images")
    update = {name: value for name, value in taken.items() if name not in given}
    if inputs.seed is None and draft.seed is not None:  # "seed": null is no seed given
        update["seed"] = draft.seed
    final = inputs.model_copy(update=update).with_upscale_scale()
    if not final.references and final.prompt is None:
        # The request's nulls took away what conditioned the draft (its references, or
        # its prompt alone): nothing is left to steer the final.
        message = "a final needs its draft's reference or prompt; the request gives neither"
        raise _refused(message, "input.redux_image")
    own = "redux_image" not in update
    references = [] if own else draft.input_files[: len(drafted.references)]
    return Final(input=final, files=[*references, draft.output[source.index]], own_references=own)


def checked_size(final: PredictionInput, draft_size: tuple[int, int]) -> tuple[int, int]:
    """The final's size from its draft's, or a 400 naming the field that makes it too large."""
    try:
        return final.upscaled_size(draft_size)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise _refused(message, f"input.{field}") from None


def files_gone(draft: Job) -> ImageFileNotFound:
    """The draft's files are no longer stored (its retention ran out, or it was deleted)."""
    return ImageFileNotFound(
        "image_file_not_found",
        f"{FIELD}: the files of prediction '{draft.id}' are no longer stored (expired or deleted)",
        field=FIELD,
    )
