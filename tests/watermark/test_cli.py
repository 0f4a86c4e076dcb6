"""`radguard watermark ...` end to end, including bad input."""

from __future__ import annotations

import json
import stat

import numpy as np
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.dicom import pixel_array, read_dataset, write_dataset
from tests.conftest import MR_NATIVE, RG1_J2K


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output + (result.stderr or "")
    return result


def test_embed_check_tamper_restore(pki, tmp_path):
    key = tmp_path / "wm.key"
    assert run("watermark", "keygen", "-o", key).exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert run("watermark", "keygen", "-o", key).exit_code == 2  # never overwrite a key
    marked = tmp_path / "wm.dcm"
    result = run("watermark", "embed", RG1_J2K, "-o", marked, "--key", key,
                 "--payload-from-cert", pki.cert_path)
    assert result.exit_code == 0, result.stderr
    ok = run("watermark", "check", marked, "--key", key, "--json")
    report = json.loads(ok.output)
    assert ok.exit_code == 0 and report["intact"] is True and report["regions"] == []
    assert "DX Room 3" in report["payload"]["signer"]

    ds = read_dataset(marked)
    arr = pixel_array(ds).copy()
    arr[1000:1032, 700:732] = arr[300:332, 300:332]
    ds.PixelData = arr.tobytes()
    write_dataset(ds, tmp_path / "tampered.dcm")
    overlay = tmp_path / "overlay.png"
    bad = run("watermark", "check", tmp_path / "tampered.dcm", "--key", key, "--json",
              "--overlay", overlay)
    report = json.loads(bad.output)
    assert bad.exit_code == 1 and report["intact"] is False
    assert any(x0 < 732 and 700 < x1 and y0 < 1032 and 1000 < y1
               for x0, y0, x1, y1 in report["regions"])
    assert Image.open(overlay).size == (arr.shape[1], arr.shape[0])

    restored = tmp_path / "restored.dcm"
    assert run("watermark", "restore", marked, "-o", restored, "--key", key).exit_code == 0
    assert np.array_equal(pixel_array(read_dataset(restored)),
                          pixel_array(read_dataset(RG1_J2K)))


def test_bad_inputs_are_one_line_errors(tmp_path):
    key = tmp_path / "wm.key"
    other = tmp_path / "other.key"
    run("watermark", "keygen", "-o", key)
    run("watermark", "keygen", "-o", other)
    marked = tmp_path / "wm.dcm"
    run("watermark", "embed", MR_NATIVE, "-o", marked, "--key", key)
    wrong = run("watermark", "check", marked, "--key", other)
    assert wrong.exit_code == 2 and "key does not match" in wrong.stderr
    assert run("watermark", "restore", marked, "-o", tmp_path / "x.dcm", "--key",
               other).exit_code == 2
    assert not (tmp_path / "x.dcm").exists()
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(marked.read_bytes()[:-4000])
    result = run("watermark", "check", truncated, "--key", key)
    assert result.exit_code == 2 and "truncated" in result.stderr
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(colour)
    assert run("watermark", "embed", colour, "-o", tmp_path / "c.png", "--key",
               key).exit_code == 2
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(tiny)
    small = run("watermark", "embed", tiny, "-o", tmp_path / "t.png", "--key", key)
    assert small.exit_code == 2 and "too small" in small.stderr
    assert run("watermark", "check", MR_NATIVE, "--key", key).exit_code == 2  # no mark
    missing = run("watermark", "check", marked, "--key", tmp_path / "nokey")
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_sixteen_bit_png_round_trip(tmp_path):
    key = tmp_path / "wm.key"
    run("watermark", "keygen", "-o", key)
    mr = pixel_array(read_dataset(MR_NATIVE)).astype(np.uint16)
    src = tmp_path / "mr16.png"
    Image.fromarray(mr).save(src)
    assert run("watermark", "embed", src, "-o", tmp_path / "m.png", "--key", key,
               "--identity", "CT scanner 7").exit_code == 0
    check = run("watermark", "check", tmp_path / "m.png", "--key", key, "--json")
    assert json.loads(check.output)["payload"]["signer"] == "CT scanner 7"
    assert run("watermark", "restore", tmp_path / "m.png", "-o", tmp_path / "r.png", "--key",
               key).exit_code == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "r.png")), mr)


def test_export_and_trace(tmp_path):
    key = tmp_path / "wm.key"
    run("watermark", "keygen", "-o", key)
    registry = tmp_path / "exports.jsonl"
    result = run("watermark", "export", RG1_J2K, "-o", tmp_path / "teaching.jpg", "--key", key,
                 "--registry", registry, "--quality", "85")
    assert result.exit_code == 0, result.stderr
    leaked = tmp_path / "leaked.jpg"
    img = Image.open(tmp_path / "teaching.jpg")
    img.resize((img.width // 2, img.height // 2)).convert("RGB").save(leaked, quality=75)
    trace = run("watermark", "trace", leaked, "--key", key, "--registry", registry, "--json")
    found = json.loads(trace.output)
    assert trace.exit_code == 0 and found["found"]
    assert found["registry_entry"]["sop_instance_uid"] == read_dataset(RG1_J2K).SOPInstanceUID
