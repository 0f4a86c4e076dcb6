"""The robust export mark: JPEG q75, 0.5x resize and grey conversion keep the ID."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from radguard.images import window_to_8bit
from radguard.watermark import (
    WatermarkKey,
    decode_export_mark,
    embed_export_mark,
    lookup_export,
    new_export_id,
    register_export,
)
from tests.watermark.conftest import DICOM_IMAGES, PNG_SAMPLE, load


def _jpeg(a, quality=75):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buf.getvalue())))


def _half(a):
    return np.array(Image.fromarray(a).resize((a.shape[1] // 2, a.shape[0] // 2),
                                              Image.BILINEAR))


def _grey(a):  # exported as colour, converted back to grey
    return np.array(Image.fromarray(a).convert("RGB").convert("L"))


ATTACKS = {"jpeg75": _jpeg, "half": _half, "grey": _grey,
           "all three": lambda a: _jpeg(_grey(_half(a)))}


def _exports():
    for path in DICOM_IMAGES + [p for p in PNG_SAMPLE if "dcgan" not in str(p)]:
        frame, *_ = load(path)
        if min(frame.shape) >= 256:
            yield path.name, window_to_8bit(frame)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_export_id_survives_with_zero_bit_errors(wm_key, attack):
    checked = 0
    for name, grey in _exports():
        export_id = new_export_id()
        marked = embed_export_mark(grey, wm_key, export_id)
        psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - grey) ** 2))
        assert psnr > 38, (name, psnr)
        mark = decode_export_mark(ATTACKS[attack](marked), wm_key)
        assert mark.crc_ok and mark.export_id == export_id, (name, attack)
        checked += 1
    assert checked >= 15


def test_no_mark_and_wrong_key_are_not_misread(wm_key):
    _name, grey = next(iter(_exports()))
    assert not decode_export_mark(grey, wm_key).crc_ok
    marked = embed_export_mark(grey, wm_key, 12345)
    other = WatermarkKey.from_secret(b"another export key, not ours!")
    assert not decode_export_mark(marked, other).crc_ok


def test_too_small_for_an_export_mark(wm_key):
    from radguard.errors import RadguardError

    with pytest.raises(RadguardError, match="too small"):
        embed_export_mark(np.full((200, 300), 100, np.uint8), wm_key, 1)


def test_registry_round_trip(tmp_path):
    registry = tmp_path / "exports.jsonl"
    register_export(registry, 0xABC, {"sop_instance_uid": "1.2.3"})
    register_export(registry, 0xDEF, {"sop_instance_uid": "4.5.6"})
    assert lookup_export(registry, 0xDEF)["sop_instance_uid"] == "4.5.6"
    assert lookup_export(registry, 0x123) is None
