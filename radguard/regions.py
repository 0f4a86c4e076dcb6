"""Group flagged grid cells into boxes, shared by every detector that reports regions.

The watermark's failed tag blocks and the forensic detectors' flagged blocks are both masks
on a regular grid; reviewers want them as a few boxes, biggest (most cells) first.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["mask_boxes"]

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def mask_boxes(mask: np.ndarray, cell: int = 1) -> list[list[int]]:
    """8-connected components of a 2-D ``mask`` as ``[x0, y0, x1, y1]`` boxes in pixels
    (cells of ``cell`` pixels; x1, y1 exclusive), the component with most cells first."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_NEIGHBOURS)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    boxes = [
        (int(sizes[i]), [s[1].start * cell, s[0].start * cell, s[1].stop * cell, s[0].stop * cell])
        for i, s in enumerate(ndimage.find_objects(labels))
    ]
    boxes.sort(key=lambda item: -item[0])
    return [box for _, box in boxes]
