"""A robust mark for exported 8-bit copies (teaching files, reports, leaks).

The exported image is cut into a 32 x 32 grid of cells *relative to its size*, so the grid
survives resizing. Each cell's mean grey level is moved (by at most delta/2 levels) onto a
keyed quantisation lattice that encodes one bit (quantisation index modulation with a
secret dither per cell). A 48-bit export ID plus a CRC-16 is spread over the 1024 cells,
16 cells per bit, with a keyed assignment; decoding sums soft votes per bit and checks the
CRC. Cell means are area-weighted over exact fractions of the image side, so a resized copy
is measured over the same regions. JPEG compression, resizing and grey conversion keep cell
means within a fraction of a grey level, inside the lattice's decision margin. Images need a
short side of at least 256 pixels: after a 0.5x resize a smaller one leaves cells of under
four pixels, and the mark stops being reliable.

This mark is *not* reversible and not meant for diagnosis: it goes only on exported copies.
The export ID links back to the instance through the export registry (JSON lines).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.fileio import atomic_writer
from radguard.watermark.keys import WatermarkKey

__all__ = ["ExportMark", "decode_export_mark", "embed_export_mark", "export_file",
           "new_export_id", "register_export", "lookup_export"]

GRID = 32
ID_BITS = 48
CRC_BITS = 16
DELTA = 6.0  # lattice step in grey levels; the largest mean shift is DELTA / 2
MIN_SIDE = 256


class ExportMarkError(RadguardError):
    """No readable export mark (wrong key, image too small, or mark destroyed)."""


def new_export_id() -> int:
    """A random 48-bit export ID."""
    return secrets.randbits(ID_BITS)


def _crc16(value: int) -> int:
    """CRC-16/CCITT-FALSE over the 6 ID bytes."""
    crc = 0xFFFF
    for byte in value.to_bytes(6, "big"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def codeword(export_id: int) -> int:
    """The 64-bit word carried for an export ID: the ID followed by its CRC-16."""
    return (export_id << CRC_BITS) | _crc16(export_id)


def _codeword(export_id: int) -> np.ndarray:
    word = codeword(export_id)
    n = ID_BITS + CRC_BITS
    return np.array([(word >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.int64)


def _plan(key: WatermarkKey) -> tuple[np.ndarray, np.ndarray]:
    """Keyed cell -> bit assignment and per-cell dither."""
    rng = np.random.default_rng(np.frombuffer(key.export, dtype=np.uint32))
    n_cells = GRID * GRID
    n_bits = ID_BITS + CRC_BITS
    assignment = rng.permutation(np.arange(n_cells) % n_bits)
    dither = rng.uniform(0, DELTA, size=n_cells)
    return assignment, dither


def _edges(size: int) -> np.ndarray:
    return np.round(np.linspace(0, size, GRID + 1)).astype(int)


def _coverage(size: int) -> np.ndarray:
    """(GRID, size) weights: how much of each pixel lies in each cell, the cells being exact
    fractions of the side (no rounding), so a resized copy measures the same areas."""
    bounds = np.linspace(0.0, float(size), GRID + 1)
    left, right = np.arange(size, dtype=np.float64), np.arange(1, size + 1, dtype=np.float64)
    overlap = (np.minimum(right[None, :], bounds[1:, None])
               - np.maximum(left[None, :], bounds[:-1, None]))
    return np.clip(overlap, 0.0, None)


def _cell_means(img: np.ndarray) -> np.ndarray:
    """Area-weighted mean of every cell of the relative 32 x 32 grid."""
    wy, wx = _coverage(img.shape[0]), _coverage(img.shape[1])
    sums = wy @ img.astype(np.float64) @ wx.T
    return (sums / np.outer(wy.sum(axis=1), wx.sum(axis=1))).ravel()


def embed_export_mark(img: np.ndarray, key: WatermarkKey, export_id: int) -> np.ndarray:
    """Return an 8-bit copy of ``img`` carrying ``export_id``."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ExportMarkError("the export mark needs an 8-bit grey image")
    if min(img.shape) < MIN_SIDE:
        raise ExportMarkError(f"image too small for the export mark (short side "
                              f"{min(img.shape)} < {MIN_SIDE} pixels)")
    assignment, dither = _plan(key)
    bits = _codeword(export_id)[assignment]
    ys, xs = _edges(img.shape[0]), _edges(img.shape[1])
    out = img.astype(np.float64)
    for _ in range(8):  # clipping and shared border pixels leave cells short: iterate
        means = _cell_means(out)
        offset = dither + bits * DELTA / 2
        target = np.round((means - offset) / DELTA) * DELTA + offset
        shift = (target - means).reshape(GRID, GRID)
        if np.abs(shift).max() < 0.05:
            break
        field_ = np.repeat(np.repeat(shift, np.diff(ys), axis=0), np.diff(xs), axis=1)
        out = np.clip(out + field_, 0, 255)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ExportMark:
    """A decoded export mark."""

    export_id: int
    crc_ok: bool
    confidence: float  # mean |soft vote| per bit, 0..1
    codeword: int = 0  # the 64 decoded bits (ID and CRC), for bit-error measurements

    @property
    def hex_id(self) -> str:
        """The export ID as 12 hex digits."""
        return f"{self.export_id:012x}"


def decode_export_mark(img: np.ndarray, key: WatermarkKey) -> ExportMark:
    """Read the export ID from an exported (possibly recompressed, resized) image."""
    if img.ndim == 3:
        img = img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if min(img.shape[:2]) < GRID:
        raise ExportMarkError("image too small to carry an export mark")
    assignment, dither = _plan(key)
    means = _cell_means(np.asarray(img, dtype=np.float64))
    soft = np.cos(2 * np.pi * (means - dither) / DELTA)  # +1 for bit 0, -1 for bit 1
    n_bits = ID_BITS + CRC_BITS
    votes = np.bincount(assignment, weights=soft, minlength=n_bits)
    counts = np.bincount(assignment, minlength=n_bits)
    bits = (votes < 0).astype(int)
    word = int("".join(map(str, bits)), 2)
    export_id, crc = word >> CRC_BITS, word & 0xFFFF
    confidence = float(np.mean(np.abs(votes / counts)))
    return ExportMark(export_id, crc == _crc16(export_id), confidence, word)


def register_export(registry: str | os.PathLike[str], export_id: int,
                    record: dict[str, Any]) -> None:
    """Append one export to the JSON-lines registry (created if missing)."""
    path = Path(registry)
    entry = {"export_id": f"{export_id:012x}",
             "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    previous = path.read_bytes() if path.exists() else b""
    with atomic_writer(path, durable=True) as fh:
        fh.write(previous + (json.dumps(entry) + "\n").encode())


def lookup_export(registry: str | os.PathLike[str], export_id: int) -> dict[str, Any] | None:
    """The registry entry for ``export_id``, if any."""
    path = Path(registry)
    if not path.exists():
        return None
    wanted = f"{export_id:012x}"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("export_id") == wanted:
            return entry
    return None


def export_file(source: str | os.PathLike[str], out: str | os.PathLike[str],
                key: WatermarkKey, *, quality: int = 90,
                registry: str | os.PathLike[str] = "radguard-exports.jsonl") -> int:
    """Write an 8-bit copy of the monochrome DICOM image ``source`` to ``out`` (JPEG for a
    .jpg/.jpeg name at ``quality``, else PNG) carrying the robust mark of a new export ID,
    and record the ID with the instance's UIDs in ``registry``; returns the ID."""
    import io

    from PIL import Image

    from radguard.dicom.io import peek, read_dataset
    from radguard.dicom.pixels import pixel_info
    from radguard.fileio import atomic_write_bytes
    from radguard.images import display_frame

    ds = read_dataset(source)
    if pixel_info(ds).samples_per_pixel != 1:
        raise ExportMarkError(f"{source}: only monochrome images can be exported with a mark")
    export_id = new_export_id()
    marked = embed_export_mark(display_frame(ds), key, export_id)
    buf = io.BytesIO()
    fmt = "JPEG" if Path(out).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(marked).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    atomic_write_bytes(out, buf.getvalue())
    register_export(registry, export_id, {
        "sop_instance_uid": str(peek(ds, "SOPInstanceUID", "") or ""),
        "study_instance_uid": str(peek(ds, "StudyInstanceUID", "") or ""),
        "source": os.fspath(source), "file": os.fspath(out)})
    return export_id
