"""``radguard watermark ...``: thin wrappers over :mod:`radguard.watermark`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from radguard.errors import RadguardError

__all__ = ["watermark"]


# -- watermark ----------------------------------------------------------------------------

@click.group()
def watermark() -> None:
    """Invisible, reversible watermarks: identity in the pixels, tamper localisation,
    robust marks on exported copies."""


_wm_key_option = click.option("--key", "key_path", required=True,
                              type=click.Path(dir_okay=False),
                              help="Watermark key file (from 'radguard watermark keygen').")


@watermark.command("keygen")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def watermark_keygen(out: str, force: bool) -> None:
    """Create a random watermark key (hex, mode 0600)."""
    from radguard.watermark.keys import generate_key_file

    key = generate_key_file(out, force=force)
    click.echo(f"watermark key: {out} (0600, fingerprint {key.fingerprint})")


def _load_pixels_or_dataset(path: str) -> tuple[Any, Any, int]:
    """(dataset or None, pixels or None, bits) for a DICOM or raster input."""
    from radguard.dicom.io import read_dataset
    from radguard.images import is_dicom_path, read_grey

    if is_dicom_path(path):
        return read_dataset(path), None, 0
    pixels, bits = read_grey(path)
    return None, pixels, bits


@watermark.command("embed")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@_wm_key_option
@click.option("--payload-from-cert", "cert_path", type=click.Path(dir_okay=False),
              help="Put this certificate's subject (device / technologist) in the payload.")
@click.option("--identity", help="Identity text for the payload (instead of a certificate).")
def watermark_embed(source: str, out: str, key_path: str, cert_path: str | None,
                    identity: str | None) -> None:
    """Embed the reversible watermark (DICOM in, DICOM out; or 8/16-bit PNG in and out)."""
    from radguard.dicom.io import write_dataset
    from radguard.images import write_grey
    from radguard.provenance.keys import describe_subject, load_certificates
    from radguard.watermark import embed_dataset, embed_frame, load_key
    from radguard.watermark.scheme import Identity

    key = load_key(key_path)
    signer = identity or ""
    if cert_path:
        signer = describe_subject(load_certificates(cert_path)[0])
    ds, pixels, bits = _load_pixels_or_dataset(source)
    if ds is not None:
        marked = embed_dataset(ds, key, signer=signer)
        write_dataset(marked, out)
        click.echo(f"watermarked {source} -> {out} (new derived instance "
                   f"{marked.SOPInstanceUID}; Explicit VR Little Endian; sign it now if "
                   "signatures are required)")
        return
    frame, params = embed_frame(pixels, key, Identity(signer), lo=0, hi=(1 << bits) - 1,
                                bits_stored=bits)
    write_grey(out, frame, bits)
    click.echo(f"watermarked {source} -> {out} ({params})")


@watermark.command("check")
@click.argument("source", type=click.Path())
@_wm_key_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--overlay", type=click.Path(dir_okay=False),
              help="Write a PNG with the changed regions outlined.")
def watermark_check(source: str, key_path: str, as_json: bool, overlay: str | None) -> None:
    """Check the watermark: which regions changed, and what the payload says.
    Exit 0 if intact, 1 if anything changed."""
    from radguard.dicom.pixels import pixel_array, pixel_info
    from radguard.images import render_overlay
    from radguard.watermark import check_dataset, check_frame, load_key
    from radguard.watermark.dicom import DatasetCheck

    key = load_key(key_path)
    ds, pixels, bits = _load_pixels_or_dataset(source)
    invert = False
    if ds is not None:
        report = check_dataset(ds, key)
        frame0 = pixel_array(ds)
        frame0 = frame0[0] if frame0.ndim == 3 else frame0
        invert = pixel_info(ds).photometric == "MONOCHROME1"
    else:
        report = DatasetCheck([check_frame(pixels, key, lo=0, hi=(1 << bits) - 1)])
        frame0 = pixels
    result = {"path": source, **report.to_dict()}
    if overlay:
        render_overlay(frame0, report.frames[0].regions, overlay, invert=invert)
        result["overlay"] = overlay
    if as_json:
        click.echo(json.dumps(result))
    else:
        state = click.style("INTACT", fg="green", bold=True) if report.intact else \
            click.style("CHANGED", fg="red", bold=True)
        click.echo(f"{state}  {source}")
        payload = result["payload"]
        if payload:
            vouched = "" if payload["authenticated"] else " (NOT authenticated)"
            click.echo(f"    payload{vouched}: signer {payload['signer'] or '-'}; SOP Instance "
                       f"UID digest {payload['sop_instance_uid_digest'] or '-'}; acquired "
                       f"{payload['acquired'] or '-'}")
        for region, frame in zip(result["regions"], result["region_frames"], strict=True):
            click.echo(f"    changed region {region} (frame {frame})")
        for problem in result["problems"]:
            click.echo(f"    {problem}")
    sys.exit(0 if report.intact else 1)


@watermark.command("restore")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@_wm_key_option
def watermark_restore(source: str, out: str, key_path: str) -> None:
    """Remove the watermark, restoring the original pixels bit for bit."""
    from radguard.dicom.io import write_dataset
    from radguard.images import write_grey
    from radguard.watermark import load_key, restore_dataset, restore_frame

    key = load_key(key_path)
    ds, pixels, bits = _load_pixels_or_dataset(source)
    if ds is not None:
        write_dataset(restore_dataset(ds, key), out)
    else:
        original, _identity = restore_frame(pixels, key, lo=0, hi=(1 << bits) - 1)
        write_grey(out, original, bits)
    click.echo(f"restored {source} -> {out} (original pixels, verified by the embedded MAC)")


@watermark.command("export")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="PNG or JPEG file to write.")
@_wm_key_option
@click.option("--quality", type=click.IntRange(50, 100), default=90, show_default=True,
              help="JPEG quality (for .jpg/.jpeg outputs).")
@click.option("--registry", type=click.Path(dir_okay=False), default="radguard-exports.jsonl",
              show_default=True, help="Export registry (JSON lines) that maps IDs back.")
def watermark_export(source: str, out: str, key_path: str, quality: int,
                     registry: str) -> None:
    """Export an 8-bit copy carrying a robust, traceable export ID."""
    from radguard.watermark import export_file, load_key

    export_id = export_file(source, out, load_key(key_path), quality=quality,
                            registry=registry)
    click.echo(f"exported {source} -> {out} (export ID {export_id:012x}, registered in "
               f"{registry})")


@watermark.command("trace")
@click.argument("image", type=click.Path(dir_okay=False))
@_wm_key_option
@click.option("--registry", type=click.Path(dir_okay=False), default="radguard-exports.jsonl",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def watermark_trace(image: str, key_path: str, registry: str, as_json: bool) -> None:
    """Read the export ID from an exported (or leaked, recompressed, resized) copy."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from radguard.watermark import decode_export_mark, load_key, lookup_export

    key = load_key(key_path)
    try:
        with Image.open(image) as im:
            pixels = np.array(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise RadguardError(f"{image}: not a readable image") from exc
    mark = decode_export_mark(pixels, key)
    entry = lookup_export(registry, mark.export_id) if mark.crc_ok else None
    result = {"path": image, "found": mark.crc_ok, "export_id": mark.hex_id if mark.crc_ok
              else None, "confidence": round(mark.confidence, 3), "registry_entry": entry}
    if as_json:
        click.echo(json.dumps(result))
    elif mark.crc_ok:
        where = (f"instance {entry['sop_instance_uid']} exported {entry['exported_at']}"
                 if entry else "not in the registry")
        click.echo(f"export ID {mark.hex_id} ({where})")
    else:
        click.echo("no export mark found (wrong key, or not an exported copy)")
    sys.exit(0 if mark.crc_ok else 1)
