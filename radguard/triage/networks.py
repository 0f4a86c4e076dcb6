"""The reference networks (MONAI on CPU torch) and their input convention.

Input: the image windowed to its 0.5-99.5 percentile range, resized (aspect not kept: the
whole field of view stays) to ``size`` x ``size``, then standardised per image, so scanner
gain, bit depth and window do not change the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["build_network", "region_input", "to_input"]

DEFAULT = {"input_size": 128, "channels": [16, 32, 64, 128], "strides": [2, 2, 2, 2],
           "num_res_units": 1}


def build_network(config: dict[str, Any]) -> Any:  # torch imported lazily
    """A MONAI residual classifier with one logit output."""
    from monai.networks.nets import Classifier

    cfg = {**DEFAULT, **config}
    size = int(cfg["input_size"])
    return Classifier(in_shape=(1, size, size), classes=1, channels=tuple(cfg["channels"]),
                      strides=tuple(cfg["strides"]), num_res_units=int(cfg["num_res_units"]))


def to_input(grey: np.ndarray, size: int) -> np.ndarray:
    """(1, size, size) float32 network input from a 2D grey image."""
    from radguard.images import per_level, percentiles

    lo, hi = percentiles(grey, (0.5, 99.5))  # on the stored integers when there are any
    span = max(float(hi - lo), 1e-6)
    a = per_level(grey, lambda v: np.clip((v.astype(np.float32) - lo) / span, 0.0, 1.0)
                  .astype(np.float32))
    a = np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    a = (a - a.mean()) / (a.std() + 1e-6)
    return a[None].astype(np.float32)


def region_input(window: np.ndarray, size: int) -> np.ndarray:
    """(1, size, size) input from a (1, n, n) window cut out of a standardised image: resized
    only, so the region keeps its brightness relative to the whole image (density matters)."""
    a = np.asarray(Image.fromarray(np.ascontiguousarray(window[0], np.float32), mode="F")
                   .resize((size, size), Image.Resampling.BILINEAR))
    return a[None].astype(np.float32)
