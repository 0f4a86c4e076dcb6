"""Watermark benchmark: reversibility, imperceptibility, localisation, export robustness, speed.

Runs on every radiograph in ../shared/data/dicom and every PNG of the PNG sets
(mammo-mias, cxr-wild, synthetic-dcgan64):

1. embed -> restore bit-exact, payload decoded, PSNR and largest pixel change per image and
   bit depth;
2. localisation: a pasted 16x16 and 32x32 patch (copy-move), an inpainted (flattened) region
   and a single changed pixel per image must each be covered by a reported region, and the
   untouched images must report no changed block at all; for the DICOM radiographs also a
   collage: a region of the same picture marked a second time with the same key, pasted at
   the same place (format version 1 let such blocks pass);
3. robust export mark: JPEG q75, 0.5x resize, grey conversion and all three together,
   bit error rate of the 64-bit codeword and ID recovery rate;
4. speed of embed and check on a 2048 x 2048 16-bit image (one core; and the check of the
   same image in format version 1), next to
   invisible-watermark's dwtDct on the same image in 8 bits when that package is
   installed, and next to plain SHA-256 of the pixels in any case.

    python benchmarks/bench_watermark.py [--png-limit N] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.dicom import pixel_array, pixel_info, read_dataset  # noqa: E402
from radguard.errors import RadguardError  # noqa: E402
from radguard.images import window_to_8bit  # noqa: E402
from radguard.watermark import (  # noqa: E402
    WatermarkKey,
    check_frame,
    decode_export_mark,
    embed_export_mark,
    embed_frame,
    restore_frame,
)
from radguard.watermark.export import CRC_BITS, ID_BITS, codeword  # noqa: E402
from radguard.watermark.scheme import Identity, uid_digest  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
KEY = WatermarkKey.from_secret(b"radguard benchmark watermark key")
IDENTITY = Identity("CN=DX Room 3, serialNumber=SN-3", uid_digest("1.2.3.4"), "20261123", 0)


def _images(png_limit: int | None):
    for path in sorted((SHARED / "dicom").rglob("*.dcm")):
        try:
            ds = read_dataset(path)
            info = pixel_info(ds)
            if info.samples_per_pixel != 1:
                print(f"skip {path.name}: {info.photometric} (colour is refused by design)")
                continue
            arr = pixel_array(ds).astype(np.int64).reshape(info.frames, info.rows,
                                                           info.columns)[0]
        except RadguardError as exc:
            print(f"skip {path.name}: {exc}")
            continue
        yield "dicom", path.name, arr, info.min_value, info.max_value, info.bits_stored
    for folder in ("mammo-mias", "cxr-wild", "synthetic-dcgan64"):
        files = sorted((SHARED / folder).rglob("*.png"))[:png_limit]
        for path in files:
            arr = np.array(Image.open(path).convert("L")).astype(np.int64)
            yield folder, path.name, arr, 0, 255, 8


def _edits(marked: np.ndarray, rng: np.random.Generator):
    h, w = marked.shape
    for kind, size in (("patch16", 16), ("patch32", 32), ("inpaint", 20), ("pixel", 1)):
        if min(h, w) <= 2 * size + 2:
            continue
        t = marked.copy()
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        if kind.startswith("patch"):
            sy, sx = (y + h // 2) % (h - size), (x + w // 3) % (w - size)
            t[y : y + size, x : x + size] = marked[sy : sy + size, sx : sx + size]
        elif kind == "inpaint":
            ring = marked[max(0, y - 2) : y + size + 2, max(0, x - 2) : x + size + 2]
            t[y : y + size, x : x + size] = int(np.median(ring))
        else:
            t[y, x] = t[y, x] - 1 if t[y, x] > 0 else t[y, x] + 1
        if not np.array_equal(t, marked):
            yield kind, t, (x, y, x + size, y + size)


def _hit(regions: list[list[int]], box: tuple[int, int, int, int]) -> bool:
    return any(r[0] < box[2] and box[0] < r[2] and r[1] < box[3] and box[1] < r[3]
               for r in regions)


def _jpeg(a: np.ndarray, q: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=q)
    return np.array(Image.open(io.BytesIO(buf.getvalue())))


def _half(a: np.ndarray) -> np.ndarray:
    return np.array(Image.fromarray(a).resize((a.shape[1] // 2, a.shape[0] // 2),
                                              Image.BILINEAR))


def _grey(a: np.ndarray) -> np.ndarray:
    return np.array(Image.fromarray(a).convert("RGB").convert("L"))


ATTACKS = {"jpeg q75": _jpeg, "0.5x resize": _half, "grey conversion": _grey,
           "all three": lambda a: _jpeg(_grey(_half(a)))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--png-limit", type=int, default=None,
                        help="at most this many PNGs per set (default: all)")
    parser.add_argument("--quick", action="store_true", help="20 PNGs per set")
    args = parser.parse_args()
    limit = 20 if args.quick else args.png_limit

    dicom_rows = []
    sets: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    loc = Counter()
    loc_total = Counter()
    false_blocks = 0
    clean_images = 0
    export = Counter()
    export_bits = Counter()
    export_images = 0
    export_refused = 0
    psnr_export: list[float] = []
    for group, name, arr, lo, hi, bits in _images(limit):
        t0 = time.perf_counter()
        try:
            marked, params = embed_frame(arr, KEY, IDENTITY, lo=lo, hi=hi, bits_stored=bits)
        except RadguardError as exc:
            sets[group]["refused"].append(f"{name}: {exc}")
            continue
        t_embed = time.perf_counter() - t0
        restored, identity = restore_frame(marked, KEY, lo=lo, hi=hi)
        exact = bool(np.array_equal(restored, arr))
        t0 = time.perf_counter()
        clean = check_frame(marked, KEY, lo=lo, hi=hi)
        t_check = time.perf_counter() - t0
        false_blocks += clean.failed_blocks
        clean_images += 1
        diff = marked.astype(np.float64) - arr
        psnr = 10 * np.log10((hi - lo) ** 2 / max(np.mean(diff**2), 1e-12))
        row = {"name": name, "bits": bits, "shape": arr.shape, "exact": exact,
               "payload": identity == IDENTITY, "psnr": psnr,
               "max": int(np.abs(diff).max()), "params": params,
               "embed": t_embed, "check": t_check}
        if group == "dicom":
            dicom_rows.append(row)
        else:
            sets[group]["rows"].append(row)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if group == "dicom":  # collage: a region of the same picture marked again, same key
            again, _ = embed_frame(arr, KEY, IDENTITY, lo=lo, hi=hi, bits_stored=bits)
            size = 4 * params["block"]
            y = int(rng.integers(0, max(1, arr.shape[0] // size - 1))) * size
            x = int(rng.integers(0, max(1, arr.shape[1] // size - 1))) * size
            pasted = marked.copy()
            pasted[y : y + size, x : x + size] = again[y : y + size, x : x + size]
            loc_total["collage"] += 1
            found = check_frame(pasted, KEY, lo=lo, hi=hi)
            loc["collage"] += _hit(found.regions, (x, y, x + size, y + size))
        for kind, tampered, box in _edits(marked, rng):
            loc_total[kind] += 1
            try:
                found = check_frame(tampered, KEY, lo=lo, hi=hi)
                loc[kind] += _hit(found.regions, box)
            except RadguardError:
                pass
        if group != "synthetic-dcgan64":
            grey = window_to_8bit(arr) if bits > 8 else arr.astype(np.uint8)
            export_id = int(np.random.default_rng(export_images).integers(0, 2**48))
            try:
                mark8 = embed_export_mark(grey, KEY, export_id)
            except RadguardError:
                export_refused += 1
                continue
            export_images += 1
            psnr_export.append(10 * np.log10(255**2 / np.mean((mark8.astype(float) - grey)
                                                              ** 2)))
            for attack, fn in ATTACKS.items():
                got = decode_export_mark(fn(mark8), KEY)
                errors = bin(codeword(export_id) ^ got.codeword).count("1")
                export[attack] += got.crc_ok and got.export_id == export_id
                export_bits[attack] += errors

    print("== 1. reversibility and imperceptibility: DICOM radiographs (per image) ==")
    print(f"{'image':<30}{'bits':>5}{'size':>12}{'block/rows/T':>14}{'exact':>7}"
          f"{'payload':>8}{'PSNR dB':>9}{'max':>5}{'embed s':>9}{'check s':>9}")
    for r in dicom_rows:
        p = r["params"]
        print(f"{r['name']:<30}{r['bits']:>5}{'x'.join(map(str, r['shape'])):>12}"
              f"{p['block']:>6}/{p['tag_rows']}/{p['threshold']:<5}{str(r['exact']):>7}"
              f"{str(r['payload']):>8}{r['psnr']:>9.1f}{r['max']:>5}{r['embed']:>9.2f}"
              f"{r['check']:>9.2f}")
    for group, data in sets.items():
        rows = data["rows"]
        if not rows:
            continue
        psnrs = [r["psnr"] for r in rows]
        layouts = Counter(f"{r['params']['block']}/{r['params']['tag_rows']}" for r in rows)
        print(f"{group}: {len(rows)} images, exact {sum(r['exact'] for r in rows)}, payload "
              f"{sum(r['payload'] for r in rows)}, PSNR min/median/max {min(psnrs):.1f}/"
              f"{statistics.median(psnrs):.1f}/{max(psnrs):.1f} dB, max change "
              f"{max(r['max'] for r in rows)}, blocks {dict(layouts)}, refused "
              f"{len(data['refused'])}")
        for refusal in data["refused"][:3]:
            print(f"    refused: {refusal}")
    high = [r for r in dicom_rows if r["bits"] >= 12]
    print(f"12-16 bit radiographs: min PSNR {min(r['psnr'] for r in high):.1f} dB "
          f"(target >= 70)")

    print("\n== 2. localisation ==")
    for kind in loc_total:
        print(f"{kind:<10} found {loc[kind]}/{loc_total[kind]}")
    print(f"untouched images: {clean_images}, changed blocks reported: {false_blocks} "
          "(target 0)")

    print("\n== 3. robust export mark (64-bit codeword, 16 cells per bit) ==")
    print(f"{export_images} exports (PSNR min/median {min(psnr_export):.1f}/"
          f"{statistics.median(psnr_export):.1f} dB); {export_refused} refused (short side "
          "< 256 px)")
    for attack in ATTACKS:
        total_bits = export_images * (ID_BITS + CRC_BITS)
        print(f"{attack:<16} ID recovered {export[attack]}/{export_images}, bit error rate "
              f"{export_bits[attack] / max(total_bits, 1):.4f}")

    print("\n== 4. speed, 2048 x 2048 16-bit image, one core ==")
    rg1 = pixel_array(read_dataset(SHARED / "dicom" / "pylibjpeg-data" / "RG1_J2KI.dcm"))
    big = np.pad(rg1.astype(np.int64), ((0, 2048 - rg1.shape[0]), (0, 2048 - rg1.shape[1])),
                 mode="reflect")
    t0 = time.perf_counter()
    marked, params = embed_frame(big, KEY, IDENTITY, lo=0, hi=65535, bits_stored=16)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_frame(marked, KEY, lo=0, hi=65535)
    t_check = time.perf_counter() - t0
    v1, _ = embed_frame(big, KEY, IDENTITY, lo=0, hi=65535, bits_stored=16, version=1)
    check_frame(v1, KEY, lo=0, hi=65535)
    t0 = time.perf_counter()
    check_frame(v1, KEY, lo=0, hi=65535)
    t_check_v1 = time.perf_counter() - t0
    raw = big.astype("<u2").tobytes()
    t0 = time.perf_counter()
    for _ in range(10):
        hashlib.sha256(raw).digest()
    t_sha = (time.perf_counter() - t0) / 10
    print(f"radguard embed {t_embed:.3f} s, check {t_check:.3f} s (target < 1 s each; {params})")
    print(f"format version 1 check of the same image (still read): {t_check_v1:.3f} s "
          f"(version 2 takes {t_check / t_check_v1:.2f}x its time)")
    print(f"anchor: plain SHA-256 of the pixels {t_sha * 1000:.1f} ms "
          f"(embed = {t_embed / t_sha:.0f}x, check = {t_check / t_sha:.0f}x)")
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder

        bgr = np.repeat(window_to_8bit(big)[:, :, None], 3, axis=2)
        enc = WatermarkEncoder()
        enc.set_watermark("bytes", b"rgwm")
        t0 = time.perf_counter()
        out = enc.encode(bgr, "dwtDct")
        t_iw_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        WatermarkDecoder("bytes", 32).decode(out, "dwtDct")
        t_iw_dec = time.perf_counter() - t0
        print(f"anchor: invisible-watermark dwtDct (8-bit colour copy) encode {t_iw_enc:.3f} s,"
              f" decode {t_iw_dec:.3f} s")
    except ImportError:
        print("anchor: invisible-watermark is not installed here; SHA-256 above is the anchor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
