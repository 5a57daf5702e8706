"""How any picture becomes a 32x32 RGB model input: the same for cifar-predict's files and the download stage's
image-folder archives, so that a model sees its own data and a user's photos alike.

Pillow reads the image (PNG, JPEG, or anything else Pillow knows), turns it upright by its EXIF orientation and
converts it to RGB (grey and palette images too; an alpha channel is dropped). Then the largest centred square is
cropped, so the object keeps its proportions, and resized to 32x32 with Pillow's bicubic filter, which averages over
the pixels it shrinks so that a large photo does not alias. A 32x32 RGB image is used as it is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGE_SIZE = 32
ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


def to_model_input(image: Image.Image) -> tuple[np.ndarray, bool]:
    """(uint8 (32, 32, 3) RGB array, whether the image had to be changed: another size, mode or orientation)."""
    rotated = image.getexif().get(ORIENTATION, 1) != 1
    changed = rotated or image.mode != "RGB"
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        changed = True
    return np.asarray(rgb, dtype=np.uint8), changed
