"""Learned local-edit detector: where a region was filled in (lesion removed) or pasted from
another image (lesion injected), without a watermark and without a twin to match.

A small fully convolutional network looks at the 8-bit image and its fine residual (the
quantum noise and JPEG texture a real detector leaves everywhere) and gives, for every 4 x 4
cell, the probability that the cell was edited. Fills lack the surrounding noise and carry the
smooth gradients of an interpolator; splices bring a seam and a second noise texture. Its
receptive field (about 140 px) lets it compare a region with its neighbourhood.

Weights: ``forensics/data/local_edit_detector.pt`` (130 KB), reproduced by
``scripts/train_tamper_detector.py`` from the training split of ``../shared/data`` with the
simulated edits of ``scripts/tamperdata.py``. The same network exported to ONNX
(``local_edit_detector.onnx``, written by that script, stamped with the SHA-256 of the ``.pt``
it came from) is what runs: onnxruntime computes the same map (to about 1e-5) in less than
half of torch's time on one core. Weights without an export run in torch. The image-level
score is the highest mean probability over 4 x 4 cells (16 px). Its threshold (not the
network, which trained on all four training sources) is picked leave-one-source-out on
untouched validation images as stored and under ordinary processing
(``scripts/realproc.py``: resizing, JPEG, sharpening, equalisation, window/level, denoising,
text, markers, lines, electrodes, collimation): for each training source, the score 0.5% of
the other sources' images reach; the worst fold ships. Measured rates:
``benchmarks/bench_forensics.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np

from radguard.errors import RadguardError

__all__ = ["CELL", "LocalEditDetector", "LocalEditMap", "WEIGHTS_PATH", "build_network",
           "export_onnx", "load_local_detector", "network_input", "smoothed_max"]

WEIGHTS_PATH = Path(__file__).with_name("data") / "local_edit_detector.pt"
CELL = 4  # output cell edge in analysed pixels


def network_input(a: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """(2, h, w) float32: the centred 8-bit image and its clipped fine residual (a prepared
    image from :func:`radguard.forensics.cues.prepare`, or a training crop; ``residual``: its
    fine residual, when the caller has it already)."""
    from radguard.forensics.cues import fine_residual

    a = np.asarray(a, dtype=np.float32)
    # the same 3 x 3 high-pass the synthetic detector's cues read
    r = fine_residual(a) if residual is None else residual
    return np.stack([(a - 128.0) / 64.0, np.clip(r, -8.0, 8.0) / 4.0]).astype(np.float32)


def build_network() -> Any:  # torch is imported lazily
    """The fully convolutional detector: two stride-2 stages, then dilated context at 1/4."""
    import torch.nn as nn

    def block(cin: int, cout: int, k: int = 3, stride: int = 1,
              dilation: int = 1) -> list[nn.Module]:
        pad = dilation * (k - 1) // 2 if stride == 1 else 1
        return [
            nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(2, 24, k=4, stride=2),
        *block(24, 32, k=4, stride=2),
        *block(32, 32),
        *block(32, 32, dilation=2),
        *block(32, 32, dilation=4),
        *block(32, 32, dilation=8),
        *block(32, 32),
        nn.Conv2d(32, 1, 1),
    )


POOL = 4  # cells per side of the window whose mean probability makes the image score


@dataclass
class LocalEditMap:
    """Per-cell edit probabilities of one analysed image."""

    probability: np.ndarray  # (h // CELL, w // CELL)
    score: float  # image-level: the highest mean probability over POOL x POOL cells
    threshold: float

    @property
    def edited(self) -> np.ndarray:
        """Cells of the windows that reach the threshold, where the network says edited."""
        from scipy import ndimage

        windows = _pooled(self.probability) >= self.threshold
        return ndimage.maximum_filter(windows, size=POOL) & (self.probability >= 0.5)


class LocalEditDetector:
    """Inference with one set of trained weights (see module docstring): in torch, or in the
    onnxruntime ``session`` of their export when one is given."""

    def __init__(self, state: dict[str, Any], session: Any = None) -> None:
        import torch

        try:
            self.net = build_network()
            self.net.load_state_dict({k: v.float() if v.is_floating_point() else v
                                      for k, v in state["weights"].items()})
            self.threshold = float(state["threshold"])
            self.info = dict(state.get("info", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RadguardError(f"local-edit detector weights are malformed ({exc})") from exc
        self.net.eval()
        self._torch = torch
        self.session = session

    @property
    def runtime(self) -> str:
        """Which runtime computes the maps: ``onnxruntime`` or ``torch``."""
        return "onnxruntime" if self.session is not None else "torch"

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Cell logits (h // CELL, w // CELL) for one (1, 2, h, w) network input."""
        if self.session is not None:
            return np.asarray(self.session.run(None, {"x": x})[0])[0, 0].astype(np.float64)
        with self._torch.inference_mode():
            return self.net(self._torch.from_numpy(x))[0, 0].numpy().astype(np.float64)

    def analyse(self, a: np.ndarray, residual: np.ndarray | None = None) -> LocalEditMap:
        """Edit probabilities of a prepared 8-bit image (short side >= 32); ``residual``: its
        fine residual, used when the image divides into whole cells (a cropped image has its
        own border)."""
        h, w = (a.shape[0] // CELL) * CELL, (a.shape[1] // CELL) * CELL
        whole = residual is not None and residual.shape == (h, w)
        logits = self.logits(network_input(a[:h, :w], residual if whole else None)[None])
        p = 1.0 / (1.0 + np.exp(-logits))
        p[_extreme_cells(a[:h, :w], p.shape)] = 0.0
        return LocalEditMap(p, float(smoothed_max(p)), self.threshold)


def _extreme_cells(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Cells at or next to the image's extreme values: electrodes, markers, burned-in text,
    collimator blades and saturation - foreign objects that genuinely look pasted in. The
    copy-move layer ignores the same places."""
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 8:
        return np.zeros(grid, dtype=bool)
    extreme = (a <= lo + 1) | (a >= hi - 1)
    # numpy types any(axis=...) as maybe a scalar
    cells = cast(np.ndarray, extreme.reshape(grid[0], CELL, grid[1], CELL).any(axis=(1, 3)))
    from scipy import ndimage

    return ndimage.binary_dilation(cells, iterations=2)


def _pooled(p: np.ndarray) -> np.ndarray:
    """Mean probability of every POOL x POOL window (16 px): a wire, a clip or one stray
    cell is not an edited region; the smallest edit that counts fills such a window."""
    from scipy import ndimage

    return ndimage.uniform_filter(p, POOL, mode="constant")


def smoothed_max(p: np.ndarray) -> float:
    return float(_pooled(p).max()) if p.size else 0.0


def export_onnx(weights: str | Path = WEIGHTS_PATH) -> Path:
    """Write ``<weights>.onnx`` beside a ``.pt`` weights file: the network for onnxruntime,
    stamped with the SHA-256 of the weights it holds. Needs the ``onnx`` package."""
    import torch

    from radguard.onnxrt import write_stamped_export

    p = Path(weights)
    detector = LocalEditDetector(_read_state(p))
    return write_stamped_export(
        detector.net, torch.zeros(1, 2, 64, 64), p, p.with_suffix(".onnx"), input_name="x",
        output_name="logits", dynamic_axes={"x": {2: "h", 3: "w"}, "logits": {2: "h4", 3: "w4"}})


def _read_state(p: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise RadguardError(f"local-edit detector weights not found: {p}") from exc
    except Exception as exc:  # any unpickling failure is a bad weights file
        raise RadguardError(f"local-edit detector weights unreadable: {p} ({exc})") from exc
    if not isinstance(state, dict):
        raise RadguardError(f"local-edit detector weights are malformed: {p}")
    return state


@lru_cache(maxsize=2)
def load_local_detector(path: str | None = None) -> LocalEditDetector:
    """The shipped local-edit detector (or weights from ``path``), loaded once; run by
    onnxruntime when the weights have their ONNX export beside them (one thread per torch
    thread of the loading process: the gateway's check processes use one each)."""
    import torch

    from radguard.onnxrt import open_stamped_export

    p = Path(path) if path else WEIGHTS_PATH
    state = _read_state(p)
    session = open_stamped_export(
        p, p.with_suffix(".onnx"), threads=torch.get_num_threads(),
        remedy="python scripts/train_tamper_detector.py --export-onnx")
    return LocalEditDetector(state, session)
