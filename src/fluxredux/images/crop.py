"""How a reference image is made square before the Redux image encoder sees it.

SigLIP looks at a 384x384 square. Given another shape, its processor stretches it
("squash", what the hosted API does): a portrait reference turns into a squat one, and
the variations inherit the distortion. ``center`` keeps the middle square instead (no
distortion, the edges are lost); ``pad`` fits the whole image into a square with
mid-grey bars (nothing lost, nothing distorted). Grey, because SigLIP's normalisation
maps it to zero: the bars carry as little content as a pixel can.
"""

from __future__ import annotations

from PIL import Image

from fluxredux.schema import ReduxImageCrop

PAD_COLOUR = (128, 128, 128)


def square_reference(image: Image.Image, crop: ReduxImageCrop) -> Image.Image:
    """``image`` as the image encoder should get it (``squash``: unchanged, its processor
    stretches it)."""
    width, height = image.size
    if crop == "squash" or width == height:
        return image
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
    side = max(width, height)
    square = Image.new("RGB", (side, side), PAD_COLOUR)
    square.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return square
