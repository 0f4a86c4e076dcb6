"""WADO-RS and WADO-URI (DICOM PS3.18 sections 8 and 9): retrieve, metadata, bulk data,
frames, rendered images and thumbnails, and the older ``/wado`` URL form.

Routes (``S`` = ``/dicom-web/studies/{study}``, ``SE`` = ``S/series/{series}``,
``I`` = ``SE/instances/{sop}``):

* retrieve ``S``, ``SE``, ``I`` - multipart/related; type="application/dicom";
* metadata ``S/metadata``, ``SE/metadata``, ``I/metadata`` - application/dicom+json, bulk
  values (pixel data, binary values over 1 KiB) as ``BulkDataURI`` = ``I/bulkdata/{tag}``;
* ``I/bulkdata/{tag}``; frames ``I/frames/{1,2,...}`` - octet-stream (native) or the
  stored compressed frames under their own media type (image/jls, image/jp2, ...);
* rendered and thumbnail ``{S,SE,I,I/frames/{n}}/rendered|thumbnail`` - image/jpeg or
  image/png (``window``, ``viewport``, ``quality``); study and series rendered are a part
  per instance, thumbnails one image (the middle instance), an instance its first frame;
* WADO-URI ``GET /wado?requestType=WADO&studyUID=...&seriesUID=...&objectUID=...``.

Retrieving objects, frames and bulk data counts towards the bulk-read alarm (one per
object, one per frames or bulk data request).

Every route takes the radiologist role (admins too) and serves only what
:meth:`~radguard.gateway.store.Store.visible_instances` lets the caller see: clinical
copies, plus quarantined ones for the admins who decide about them. UIDs in the path are
checked as at the door (400 when malformed); what is not visible is 404.

Transfer syntaxes are negotiated from ``Accept`` (PS3.18 8.7.3): without a
``transfer-syntax`` parameter an object comes as Explicit VR Little Endian, ``*`` as stored
(the file streamed as it lies in the store). Transcoding only goes where no pixel is lost:
to a native syntax (a lossy original keeps ``LossyImageCompression`` = 01), or from native
or lossless pixels to a lossless syntax an installed encoder writes (RLE, JPEG-LS and
JPEG 2000 lossless); anything else is 406, never a silent lossy recompression.

Decoding runs inside :func:`~radguard.dicom.limits.decode_scope`, so the decode budget
bounds what concurrent requests hold; pixel data that cannot be decoded is 422 with the
decoder's reason, never a traceback.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from radguard.dicom.io import (
    detached_view,
    encode_dataset,
    peek,
    read_dataset,
    source_view,
    stored_element,
)
from radguard.dicom.limits import decode_scope
from radguard.dicom.pixels import PixelInfo, pixel_array, pixel_info
from radguard.dicom.uids import uid_problem
from radguard.errors import RadguardError
from radguard.gateway.auth import User, may_see_quarantine
from radguard.gateway.store import Instance, StoreError

if TYPE_CHECKING:
    from radguard.gateway.web import _Web

__all__ = ["Render", "add_wado_routes", "parse_accept", "render", "render_pixels", "tint"]

log = logging.getLogger("radguard.gateway")

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
PIXEL_DATA = 0x7FE00010
#: syntaxes whose pixel data is the stored values themselves (big endian is decoded)
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED, BIG_ENDIAN})
#: what a retrieve may transcode to without touching pixel values
NATIVE_TARGETS = frozenset({IMPLICIT_LE, EXPLICIT_LE})
#: lossless compressed syntaxes pydicom can write, when its encoder's plugin is installed
LOSSLESS_TARGETS = (RLE, JPEG_LS_LOSSLESS, J2K_LOSSLESS)
#: syntaxes that may carry lossy pixel data (JPEG 2000 "lossy or lossless" counts as lossy)
LOSSY = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 107))})
#: PS3.18 Table 8.7.3-2/6.1.1.8-3: the media type of one compressed frame, per syntax
FRAME_MEDIA: dict[str, tuple[str, ...]] = {
    RLE: ("image/dicom-rle", "image/x-dicom-rle"),
    **{f"1.2.840.10008.1.2.4.{n}": ("image/jpeg",) for n in (50, 51, 57, 70)},
    JPEG_LS_LOSSLESS: ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.81": ("image/jls", "image/x-jls"),
    J2K_LOSSLESS: ("image/jp2",), "1.2.840.10008.1.2.4.91": ("image/jp2",),
    "1.2.840.10008.1.2.4.92": ("image/jpx",), "1.2.840.10008.1.2.4.93": ("image/jpx",),
    **{f"1.2.840.10008.1.2.4.{n}": ("image/jphc",) for n in (201, 202, 203)},
}
BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
BULK_THRESHOLD = 1024  # binary values larger than this go by BulkDataURI
THUMBNAIL = 128  # a thumbnail's longest side when the request names no viewport
MAX_VIEWPORT = 8192  # the largest rendered side asked for (a bigger one is 400, not 10 GB)
MAX_FRAMES = 1000  # frame numbers in one frames request
_FRAMES = re.compile(r"^[0-9]{1,9}(,[0-9]{1,9})*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


# -- Accept --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: the media type (lower case), its parameters, q."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        return self.type == "multipart/related"

    @property
    def part_type(self) -> str:
        """What the parts are (``type=`` of multipart/related; "" when not said)."""
        return self.params.get("type", "").lower() if self.multipart else self.type

    @property
    def syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (a quoted type may hold ';' or ',')."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (stable for equal q); no header
    means anything (``*/*``). Ranges with q=0 are refusals and dropped."""
    ranges = []
    for item in _split(header or "*/*", ","):
        kind, *rest = _split(item, ";")
        params: dict[str, str] = {}
        for p in rest:
            key, _, value = p.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(kind.lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def _not_acceptable(what: str) -> HTTPException:
    return HTTPException(406, f"not acceptable: {what}")


# -- finding instances ---------------------------------------------------------------------------

def _uid(value: str) -> str:
    """A UID from the path or query, checked as at the door (400 when malformed)."""
    problem = uid_problem(value, "the UID in the request")
    if problem is not None:
        raise HTTPException(400, problem)
    return value


def find(web: _Web, user: User, study: str, series: str | None = None,
         sop: str | None = None) -> list[Instance]:
    """The instances the caller may see under the path's UIDs; 404 when there are none."""
    where, params = ["study_uid=?"], [_uid(study)]
    for column, value in (("series_uid", series), ("sop_uid", sop)):
        if value is not None:
            where.append(f"{column}=?")
            params.append(_uid(value))
    rows = web.store.visible_instances(" AND ".join(where), tuple(params),
                                       quarantine=may_see_quarantine(user))
    if not rows:
        raise HTTPException(404, "no such study, series or instance")
    return rows


def _file(web: _Web, row: Instance) -> Path:
    """An instance's file; a missing one is a store failure (503), not a client error."""
    path = web.store.file(row)
    if not path.is_file():
        raise StoreError(f"{path}: instance file missing")
    return path


def _count_reads(web: _Web, user: User, count: int, target: str) -> None:
    """The bulk-read alarm: retrieving many objects in ten minutes is audited."""
    if web.bulk.add(user.name, count):
        web.audit("alarm.bulk_read", user.name, {"limit_per_10_min": web.bulk.limit,
                                                 "last": target}, "radguard-gateway")


@contextmanager
def decoding() -> Iterator[None]:
    """Decode and render within the decode budget; what the data does not allow is 422
    with the reason (a store failure stays a 503)."""
    try:
        with decode_scope():
            yield
    except (HTTPException, StoreError, OSError):
        raise
    except RadguardError as exc:
        raise HTTPException(422, _reason(exc, 300)) from exc
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError,
            NotImplementedError) as exc:
        raise HTTPException(422, f"cannot decode the pixel data: {_reason(exc, 200)}") from exc


def _reason(exc: BaseException, limit: int) -> str:
    """An exception's message on one line, without the traceback pydicom puts in some."""
    text = " ".join(str(exc).split())
    return text.split(" Traceback (most recent call last)")[0][:limit]


def _read(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """A stored object, parsed strictly (large values stay in the mapped file)."""
    return read_dataset(path, stop_before_pixels=stop_before_pixels)


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "") or EXPLICIT_LE)


def _is_lossy(ds: Dataset, syntax: str) -> bool:
    return syntax in LOSSY or str(peek(ds, "LossyImageCompression", "") or "").strip() == "01"


# -- multipart -----------------------------------------------------------------------------------

Body = Path | Callable[[], bytes | None] | bytes


def _multipart(parts: Iterable[tuple[str, Body]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body, streamed: files 1 MiB at a time, transcoded objects as
    they are made (one at a time); a part made as None is left out."""
    for ctype, body in parts:
        data = body() if callable(body) else body
        if data is None:
            continue
        yield f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode()
        if isinstance(data, Path):
            with data.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        else:
            yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _multipart_response(parts: list[tuple[str, Body]], part_type: str) -> StreamingResponse:
    boundary = "radguard-" + secrets.token_hex(12)
    return StreamingResponse(_multipart(parts, boundary), media_type=(
        f'multipart/related; type="{part_type}"; boundary={boundary}'))


# -- retrieve: transfer syntaxes -----------------------------------------------------------------

def retrieve_wishes(ranges: list[MediaRange]) -> list[str]:
    """The transfer syntaxes the client accepts for whole objects, best first ("*": as
    stored); 406 when it accepts no DICOM object at all."""
    wishes = []
    for r in ranges:
        if r.multipart:
            if (r.part_type or DICOM) not in (DICOM, "*/*", "application/*"):
                continue
        elif r.type not in (DICOM, "*/*", "multipart/*", "application/*"):
            continue
        wishes.append(r.syntax or EXPLICIT_LE)
    if not wishes:
        raise _not_acceptable("this resource is sent as multipart/related; "
                              'type="application/dicom"')
    return wishes


def _can_encode(syntax: str) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(syntax).is_available)
    except (ValueError, NotImplementedError):
        return False


def choose_syntax(stored: str, lossy: bool, has_pixels: bool, wishes: list[str]) -> str | None:
    """The first wished syntax this object can be sent in without losing a pixel or
    changing what its syntax claims; None when there is none."""
    for wish in wishes:
        if wish in ("*", stored):
            return stored
        if wish in NATIVE_TARGETS:
            return wish
        if wish in FRAME_MEDIA and not has_pixels:
            return wish  # no pixel data: the syntax only says Explicit VR Little Endian
        if wish in LOSSLESS_TARGETS and not lossy and _can_encode(wish):
            return wish
    return None


def _header_facts(path: Path) -> tuple[str, bool, bool]:
    """(stored syntax, lossy, has pixel data) from the header alone."""
    ds = _read(path, stop_before_pixels=True)
    syntax = _syntax(ds)
    # stop_before_pixels drops PixelData: an image has Rows
    return syntax, _is_lossy(ds, syntax), "Rows" in ds


def transcode(path: Path, target: str) -> bytes:
    """The object at ``path`` as Part 10 bytes in ``target`` (a syntax
    :func:`choose_syntax` picked): native pixels are written as they are, compressed or big
    endian ones decoded first, and compressed again only to a lossless syntax."""
    with decoding():
        ds = _read(path)
        stored = _syntax(ds)
        if "PixelData" in ds and (stored not in NATIVE_TARGETS | {DEFLATED}):
            out = _decoded_copy(ds, _is_lossy(ds, stored))
        else:
            out = detached_view(ds)
            out.file_meta = copy.deepcopy(ds.file_meta)
        if target not in NATIVE_TARGETS and "PixelData" in out:
            out.compress(target, encoding_plugin="", generate_instance_uid=False)
        return _encode(out, target)


def _encode(ds: Dataset, target: str) -> bytes:
    """Part 10 bytes in ``target``; elements pydicom cannot write as they were read (implicit
    VR data under an explicit VR syntax: no VR) are converted first, taking the
    dictionary's VR."""
    try:
        return encode_dataset(ds, target)
    except RadguardError:
        for tag in list(ds.keys()):
            ds[tag]  # noqa: B018 - converting the raw element is the point
        return encode_dataset(ds, target)


def _decoded_copy(ds: Dataset, lossy: bool) -> Dataset:
    """A copy of ``ds`` with native little-endian pixel data (colour as RGB, interleaved)."""
    from pydicom.pixels import pack_bits

    info = pixel_info(ds)
    arr = pixel_array(ds)
    out = detached_view(ds)
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.file_meta.TransferSyntaxUID = EXPLICIT_LE
    if info.bits_allocated == 1:
        data = pack_bits(arr)
    else:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    out.PixelData = data + b"\0" * (len(data) % 2)
    out["PixelData"].VR = "OB" if info.bits_allocated <= 8 else "OW"
    if info.samples_per_pixel > 1:
        out.PlanarConfiguration = 0
        if info.photometric.startswith("YBR"):
            out.PhotometricInterpretation = "RGB"  # pydicom decodes YCbCr to RGB
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:
            del out[keyword]
    if lossy:
        out.LossyImageCompression = "01"
    return out


def _retrieve(web: _Web, user: User, rows: list[Instance], request: Request,
              target: str) -> Response:
    """A WADO-RS retrieve: each object as stored or transcoded, 406 when one cannot be
    sent in any syntax the client accepts."""
    wishes = retrieve_wishes(parse_accept(request.headers.get("accept")))
    parts: list[tuple[str, Body]] = []
    for row in rows:
        path = _file(web, row)
        if wishes[0] == "*":
            parts.append((f"{DICOM}; transfer-syntax={_stored_syntax(path)}", path))
            continue
        with decoding():
            stored, lossy, has_pixels = _header_facts(path)
        chosen = choose_syntax(stored, lossy, has_pixels, wishes)
        if chosen is None:
            raise _not_acceptable(f"instance {row.sop_uid} is stored in {stored} and cannot "
                                  "be sent losslessly in any transfer syntax asked for")
        body: Body = path if chosen == stored else _lazy(transcode, path, chosen)
        parts.append((f"{DICOM}; transfer-syntax={chosen}", body))
    if len(parts) == 1 and callable(parts[0][1]):
        parts = [(parts[0][0], parts[0][1]())]  # one object: its errors are a clean 422
    _count_reads(web, user, len(rows), target)
    return _multipart_response(parts, DICOM)


def _stored_syntax(path: Path) -> str:
    """The stored transfer syntax, from the file meta information alone."""
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", EXPLICIT_LE))
    except OSError:
        raise  # the store cannot be read: 503
    except Exception as exc:  # noqa: BLE001 - a stored file the parser refuses
        raise HTTPException(422, f"stored object unreadable: {str(exc)[:200]}") from exc


def _lazy(fn: Callable[[Path, str], bytes], path: Path, target: str) -> Callable[[], bytes]:
    return lambda: fn(path, target)


# -- metadata and bulk data ----------------------------------------------------------------------

def _vr_of(elem: Any, tag: int, ds: Dataset) -> str:  # noqa: ANN401
    """An element's VR, also for implicit VR files (the dictionary's; private: UN)."""
    vr = getattr(elem, "VR", None)
    if not vr:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    if tag == PIXEL_DATA and " or " in vr:
        return "OW" if int(peek(ds, "BitsAllocated", 8) or 8) > 8 else "OB"
    return "OW" if " or " in vr and "OW" in vr else vr


def _length(elem: Any) -> int:  # noqa: ANN401
    length = getattr(elem, "length", None)
    if isinstance(length, int) and length != 0xFFFFFFFF:
        return length
    value = getattr(elem, "value", None)
    return len(value) if isinstance(value, bytes | bytearray) else 1 << 30


def metadata(ds: Dataset, url: str) -> dict[str, Any]:
    """One DICOM JSON object (PS3.18 F.2): bulk values (pixel data, binary values over
    1 KiB) as ``BulkDataURI`` under ``url``/bulkdata, never read from the file."""
    view = detached_view(ds)
    bulk: dict[str, dict[str, str]] = {}
    for tag in list(view.keys()):
        elem = stored_element(view, tag)
        vr = _vr_of(elem, tag, ds)
        if tag == PIXEL_DATA or (vr in BULK_VRS and _length(elem) > BULK_THRESHOLD):
            bulk[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{tag:08X}"}
            del view[tag]
    answer = {**view.to_json_dict(suppress_invalid_tags=True), **bulk}
    return dict(sorted(answer.items()))


def _instance_url(request: Request, row: Instance) -> str:
    """The instance's WADO-RS URL as this request reached the gateway (any host or port,
    behind a proxy with its root path)."""
    base = str(request.base_url).rstrip("/")
    return (f"{base}/dicom-web/studies/{row.study_uid}/series/{row.series_uid}"
            f"/instances/{row.sop_uid}")


def _metadata_response(web: _Web, user: User, rows: list[Instance], request: Request
                       ) -> Response:
    """The instances' DICOM JSON as a stream, one object at a time (a 5,000-instance
    study is never held whole); every header read counts for the bulk-read alarm."""
    _count_reads(web, user, len(rows), rows[0].study_uid)
    paths = [(row, _file(web, row)) for row in rows]  # a missing file: 503 before answering

    def objects() -> Iterator[bytes]:
        yield b"["
        for number, (row, path) in enumerate(paths):
            try:
                with decoding():
                    one = json.dumps(metadata(_read(path), _instance_url(request, row)))
            except HTTPException as exc:  # one unreadable header: the rest still go out
                log.warning("metadata of %s left out: %s", row.sop_uid, exc.detail)
                continue
            yield (b"," if number else b"") + one.encode()
        yield b"]"

    return StreamingResponse(objects(), media_type=DICOM_JSON)


def _element_bytes(ds: Dataset, tag: int) -> bytes:
    """A top-level element's value bytes as stored (a deferred one read from the file)."""
    elem = stored_element(ds, tag)
    value = getattr(elem, "value", None)
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    source, tell = source_view(ds), getattr(elem, "value_tell", None)
    length = getattr(elem, "length", None)
    if source is not None and tell is not None and isinstance(length, int):
        return bytes(source[tell:tell + length])
    raise HTTPException(422, "this value cannot be read as bulk data")


def _octet_only(request: Request) -> bool:
    """Whether the client takes octet-stream parts, as multipart (True) or bare (False)."""
    for r in parse_accept(request.headers.get("accept")):
        if r.multipart and (r.part_type or OCTET) in (OCTET, "*/*", "application/*"):
            return True
        if r.type in ("*/*", "multipart/*", "application/*"):
            return True
        if r.type == OCTET:
            return False
    raise _not_acceptable('bulk data is sent as multipart/related; '
                          'type="application/octet-stream"')


def _bulk_response(ds: Dataset, tag: int, request: Request) -> Response:
    elem = stored_element(ds, tag)
    if elem is None or _vr_of(elem, tag, ds) not in BULK_VRS:
        raise HTTPException(404, f"no bulk data element {tag:08X} in this instance")
    multipart = _octet_only(request)
    data = _element_bytes(ds, tag)
    if not multipart:
        return Response(data, media_type=OCTET)
    return _multipart_response([(OCTET, data)], OCTET)


# -- frames --------------------------------------------------------------------------------------

def parse_frames(text: str) -> list[int]:
    """1-based frame numbers from ``1,3,5``; 400 on anything else, and on more than
    :data:`MAX_FRAMES` numbers or a number twice (``1,1,1,...`` would make one request
    hold the same frame thousands of times)."""
    if not _FRAMES.match(text) or any(int(n) < 1 for n in text.split(",")):
        raise HTTPException(400, "frames are comma-separated numbers from 1")
    numbers = [int(n) for n in text.split(",")]
    if len(numbers) > MAX_FRAMES or len(set(numbers)) != len(numbers):
        raise HTTPException(400, f"at most {MAX_FRAMES} different frame numbers per request")
    return numbers


@dataclass(frozen=True)
class FrameChoice:
    """How frames go out: ``stored`` (the compressed bytes as they are) or decoded native
    bytes; as multipart or a bare body; the parts' media type and transfer syntax."""

    stored: bool
    multipart: bool
    media: str
    syntax: str


def choose_frames(ranges: list[MediaRange], stored: str) -> FrameChoice:
    """PS3.18 8.7.3.5: octet-stream is native (``transfer-syntax=*``: as stored, which
    OHIF asks for and decodes itself); an image media type is the stored compressed bytes
    when the stored syntax is that kind; ``*/*`` is octet-stream. 406 otherwise."""
    compressed = stored not in NATIVE
    for r in ranges:
        kind = (r.part_type or OCTET) if r.multipart else r.type
        multipart = r.multipart or r.type in ("*/*", "multipart/*")
        if kind in ("*/*", "application/*", "multipart/*"):
            kind = OCTET
        if kind == OCTET and r.syntax == "*" and compressed:
            return FrameChoice(True, multipart, OCTET, stored)
        if kind == OCTET and r.syntax in (None, "*", EXPLICIT_LE):
            return FrameChoice(False, multipart, OCTET, EXPLICIT_LE)
        if kind in FRAME_MEDIA.get(stored, ()) and r.syntax in (None, "*", stored):
            return FrameChoice(True, multipart, kind, stored)
    raise _not_acceptable(f"frames of this instance (stored in {stored}) are sent as "
                          "application/octet-stream or "
                          f"{', '.join(FRAME_MEDIA.get(stored, ())) or 'nothing else'}")


class _ViewReader:
    """read/seek/tell over a memoryview, for pydicom's frame reader on a mapped file."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.pos + size)
        data = bytes(self.view[self.pos:end])
        self.pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else \
            len(self.view) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def _encapsulated_frame(ds: Dataset, info: PixelInfo, index: int) -> bytes:
    """One compressed frame's bytes as stored (PS3.5 A.4), nothing decoded."""
    from pydicom.encaps import get_frame

    elem = stored_element(ds, PIXEL_DATA)
    value = getattr(elem, "value", None)
    buffer: Any = value
    if not isinstance(value, bytes | bytearray):
        source, tell = source_view(ds), getattr(elem, "value_tell", None)
        if source is None or tell is None:
            raise HTTPException(422, "the compressed pixel data cannot be read")
        buffer = _ViewReader(source[tell:])
    return get_frame(buffer, index, number_of_frames=info.frames)


def _native_frames(ds: Dataset, info: PixelInfo, numbers: list[int]) -> list[bytes]:
    """Uncompressed little-endian bytes of the frames: sliced from native pixel data when
    it lies as the frames are sent, else decoded (compressed, big endian, 1 bit)."""
    width = info.bits_allocated // 8
    size = info.rows * info.columns * info.samples_per_pixel * width
    if _syntax(ds) in (IMPLICIT_LE, EXPLICIT_LE, DEFLATED) and info.bits_allocated % 8 == 0:
        data = _element_bytes_view(ds)
        if data is not None and len(data) >= size * info.frames:
            return [bytes(data[(n - 1) * size:n * size]) for n in numbers]
    if info.bits_allocated == 1:
        from pydicom.pixels import pack_bits

        return [pack_bits(decode_frame(ds, info, n - 1)) for n in numbers]
    out = []
    for n in numbers:
        frame = decode_frame(ds, info, n - 1)
        out.append(np.ascontiguousarray(frame).astype(frame.dtype.newbyteorder("<"),
                                                      copy=False).tobytes())
    return out


def decode_frame(ds: Dataset, info: PixelInfo, index: int) -> np.ndarray:
    """One frame decoded on its own (colour as RGB): a frame of a large multi-frame object
    costs one frame's bytes of the decode budget and of the file, not all frames'. Objects
    of one frame, big endian, 1-bit or subsampled native ones go through
    :func:`~radguard.dicom.pixels.pixel_array` whole."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    from radguard.dicom.limits import decode_budget, decoded_size

    syntax = _syntax(ds)
    native = syntax in NATIVE
    per_frame = info.rows * info.columns
    if info.bits_allocated == 1 and info.frames > 1 and info.samples_per_pixel == 1 and \
            per_frame % 8 == 0 and syntax != BIG_ENDIAN and \
            (data := _element_bytes_view(ds)) is not None:  # a bitmap's frame: its bits only
        start = index * per_frame // 8
        bits = np.frombuffer(bytes(data[start:start + per_frame // 8]), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little").reshape(info.rows, info.columns)
    if info.frames == 1 or info.bits_allocated % 8 or syntax in (BIG_ENDIAN, DEFLATED) \
            or (native and info.photometric.endswith("422")):
        arr = pixel_array(ds)
        return arr[index] if info.frames > 1 else arr
    size = decoded_size(str(getattr(ds, "filename", None) or "dataset"), info.rows,
                        info.columns, 1, info.samples_per_pixel, info.bits_allocated)
    if native:
        data = _element_bytes_view(ds)
        if data is None:
            raise HTTPException(422, "the pixel data cannot be read")
        buffer = bytes(data[index * size:(index + 1) * size])
    else:
        buffer = encapsulate([_encapsulated_frame(ds, info, index)])
    options: dict[str, Any] = {
        "rows": info.rows, "columns": info.columns, "number_of_frames": 1,
        "samples_per_pixel": info.samples_per_pixel, "bits_allocated": info.bits_allocated,
        "bits_stored": info.bits_stored, "pixel_representation": int(info.signed),
        "photometric_interpretation": info.photometric, "pixel_keyword": "PixelData"}
    if info.samples_per_pixel > 1:
        options["planar_configuration"] = int(peek(ds, "PlanarConfiguration", 0) or 0)
    with decode_budget().reserve(size * 2):  # the frame and the decoder's working copy
        try:
            arr, _ = get_decoder(EXPLICIT_LE if native else syntax).as_array(
                buffer, as_rgb=True, **options)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise HTTPException(422, f"cannot decode pixel data ({_reason(exc, 200)})") \
                from exc
    return arr


def _element_bytes_view(ds: Dataset) -> bytes | memoryview | None:
    """Native pixel data without copying it (the mapped file's bytes when deferred)."""
    elem = stored_element(ds, PIXEL_DATA)
    value = getattr(elem, "value", None)
    if isinstance(value, bytes | bytearray):
        return value
    source, tell = source_view(ds), getattr(elem, "value_tell", None)
    length = getattr(elem, "length", None)
    if source is None or tell is None or not isinstance(length, int):
        return None
    return source[tell:tell + length]


def frames_response(ds: Dataset, numbers: list[int], request: Request) -> Response:
    """Frames of one instance per the client's Accept (decoding counts against the budget
    of the caller's scope)."""
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data (no frames)")
    info = pixel_info(ds)
    if max(numbers) > info.frames:
        raise HTTPException(404, f"this instance has {info.frames} frame(s)")
    choice = choose_frames(parse_accept(request.headers.get("accept")), _syntax(ds))
    if choice.stored:
        data = [_encapsulated_frame(ds, info, n - 1) for n in numbers]
    else:
        data = _native_frames(ds, info, numbers)
    ctype = f"{choice.media}; transfer-syntax={choice.syntax}"
    if not choice.multipart:
        return Response(b"".join(data), media_type=ctype)
    return _multipart_response([(ctype, d) for d in data], choice.media)


# -- rendering -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Render:
    """How to render (PS3.18 8.3.5): format, an explicit window (center, width, function),
    the viewport to fit (0 = free in that direction), JPEG quality; ``shrink_only`` for
    the UI, which never enlarges."""

    media: str = "image/jpeg"
    window: tuple[float, float, str] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90
    shrink_only: bool = False


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[arg-type,index]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: VOI LUT function to 0..255 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    function = function.upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / max(width, 1e-9),
                                          -700, 700)))
    elif function == "LINEAR_EXACT":
        out = (values - center) / max(width, 1e-9) + 0.5
    elif width <= 1:
        out = (values > center - 0.5).astype(np.float64)
    else:
        out = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out * 255.0, 0, 255)


_CHUNK_PIXELS = 1 << 21  # the float work of a rendering is done this many pixels at a time


def _rows_at_a_time(frame: np.ndarray) -> Iterator[slice]:
    """Row bands of about :data:`_CHUNK_PIXELS` pixels: the LUTs work in float64, 8 bytes
    per pixel, which on a whole 8192x8192 frame would be 512 MiB beside the decode budget."""
    step = max(1, _CHUNK_PIXELS // max(1, frame.shape[1]))
    for start in range(0, frame.shape[0], step):
        yield slice(start, start + step)


def _grey(ds: Dataset, frame: np.ndarray, info: PixelInfo, opts: Render) -> np.ndarray:
    """A grey frame as a reader sees it: modality LUT, VOI (the request's window, else
    the object's window or VOI LUT, else min..max), MONOCHROME1 inverted; band by band."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    def values(band: slice) -> np.ndarray:
        return np.asarray(apply_modality_lut(frame[band], ds), dtype=np.float64)

    center = _first(peek(ds, "WindowCenter"))
    width = _first(peek(ds, "WindowWidth"))
    mapping: Callable[[np.ndarray], np.ndarray]
    if opts.window is not None:
        chosen = opts.window
        mapping = lambda v: window(v, *chosen)  # noqa: E731
    elif center is not None and width is not None and width > 0:
        function = str(peek(ds, "VOILUTFunction", "LINEAR") or "LINEAR")
        mapping = lambda v: window(v, center, width, function)  # noqa: E731
    elif "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        mapping = lambda v: np.clip(np.asarray(  # noqa: E731
            apply_voi_lut(v, ds, prefer_lut=True), dtype=np.float64) * 255.0
            / ((1 << bits) - 1), 0, 255)
    else:
        extremes = [(float(v.min()), float(v.max()))
                    for v in map(values, _rows_at_a_time(frame))]
        low, high = min(e[0] for e in extremes), max(e[1] for e in extremes)
        scale = 255.0 / (high - low) if high > low else 0.0
        mapping = lambda v: (v - low) * scale  # noqa: E731
    out = np.empty(frame.shape[:2], dtype=np.uint8)
    for band in _rows_at_a_time(frame):
        mapped = mapping(values(band))
        if info.photometric == "MONOCHROME1":
            mapped = 255.0 - mapped
        out[band] = np.round(mapped)
    return out


def _to_8bit(rgb: np.ndarray, bits: int) -> np.ndarray:
    if rgb.dtype == np.uint8 and bits <= 8:
        return rgb
    top = float((1 << bits) - 1) if bits < 64 else float(rgb.max() or 1)
    return np.round(np.clip(rgb.astype(np.float64) * (255.0 / top), 0, 255)).astype(np.uint8)


def render_pixels(ds: Dataset, frame: int = 0, opts: Render | None = None) -> np.ndarray:
    """One frame as displayed, in 8 bits: grey (rows, columns) or true colour (rows,
    columns, 3) - RGB and YCbCr as RGB, PALETTE COLOR through its lookup tables."""
    from pydicom.pixels import apply_color_lut

    opts = opts or Render()
    info = pixel_info(ds)
    if not 0 <= frame < info.frames:
        raise HTTPException(404, f"this instance has {info.frames} frame(s)")
    one = _reduced(decode_frame(ds, info, frame), opts)  # colour: YBR_FULL(_422) as RGB
    if info.samples_per_pixel == 3:
        return _to_8bit(one[..., :3], info.bits_stored)
    if info.photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_8bit(np.asarray(apply_color_lut(one, ds)), bits)
    return _grey(ds, one, info, opts)


def _reduced(frame: np.ndarray, opts: Render) -> np.ndarray:
    """A frame much larger than the viewport, subsampled to at least twice its size before
    the LUTs (the final resize is Lanczos): a 768-pixel view of an 8192-pixel image need
    not window 64 million pixels."""
    if opts.viewport is None:
        return frame
    vw, vh = opts.viewport
    rows, columns = frame.shape[:2]
    step = min(columns // (2 * vw) if vw else 1 << 30, rows // (2 * vh) if vh else 1 << 30)
    return np.ascontiguousarray(frame[::step, ::step]) if 2 <= step < 1 << 30 else frame


def tint(pixels: np.ndarray, heat: np.ndarray, *, start: float = 0.5,
         colour: tuple[int, int, int] = (255, 30, 30)) -> np.ndarray:
    """A rendered frame (grey or true colour) with ``colour`` blended in where ``heat``
    (values in [0, 1], same rows and columns) exceeds ``start``, as
    :func:`radguard.images.blend_heat` does for grey: a colour image keeps its colours."""
    from radguard.images import blend_heat

    if pixels.ndim == 2:
        return blend_heat(pixels, heat, start=start, colour=colour)
    alpha = np.clip((heat - start) / max(1 - start, 1e-6) * 0.6, 0, 0.6)[..., None]
    rgb = pixels.astype(np.float64) * (1 - alpha) + np.array(colour, dtype=np.float64) * alpha
    return np.round(rgb).astype(np.uint8)


def _fit(size: tuple[int, int], opts: Render) -> tuple[int, int]:
    """The size within the viewport keeping the aspect ratio (PS3.18 8.3.5.1.3)."""
    width, height = size
    if opts.viewport is None:
        return size
    vw, vh = opts.viewport
    scale = min(vw / width if vw else math.inf, vh / height if vh else math.inf)
    if not math.isfinite(scale) or (opts.shrink_only and scale >= 1):
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_picture(pixels: np.ndarray, opts: Render) -> bytes:
    """An 8-bit frame as JPEG or PNG, fitted to the viewport."""
    import io

    from PIL import Image

    picture = Image.fromarray(pixels)
    size = _fit(picture.size, opts)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if opts.media == "image/png":
        picture.save(buf, format="PNG")
    else:
        picture.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue()


def render(ds: Dataset, opts: Render | None = None, frame: int = 0) -> bytes:
    """The rendered frame (PS3.18 rendered resources and the web UI share this)."""
    opts = opts or Render()
    with decode_scope():
        return encode_picture(render_pixels(ds, frame, opts), opts)


def render_options(request: Request, *, thumbnail: bool = False) -> Render:
    """The rendered request's options: Accept (or ``accept=``), ``window``, ``viewport``,
    ``quality``; 400 when malformed, 406 for a format not offered."""
    q = request.query_params
    media = _image_media(q.get("accept") or request.headers.get("accept"))
    viewport = _pair(q["viewport"], "viewport") if "viewport" in q else \
        ((THUMBNAIL, THUMBNAIL) if thumbnail else None)
    return Render(media, _window_param(q.get("window")), viewport,
                  _quality(q.get("quality")))


def _image_media(accept: str | None) -> str:
    for r in parse_accept(accept):
        kind = r.part_type if r.multipart else r.type
        if kind in ("image/jpeg", "image/png"):
            return kind
        if kind in ("*/*", "image/*", "", "multipart/*"):
            return "image/jpeg"
    raise _not_acceptable("rendered images are image/jpeg or image/png")


def _window_param(text: str | None) -> tuple[float, float, str] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError) as exc:
        raise HTTPException(400, "window is center,width[,function]") from exc
    function = parts[2].strip().upper() if len(parts) > 2 else "LINEAR"
    if len(parts) > 3 or function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") \
            or not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise HTTPException(400, "window is center,width[,linear|linear_exact|sigmoid] "
                            "with a positive width")
    return center, width, function


def _pair(text: str, name: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        vw, vh = (int(p) if p.strip() else 0 for p in parts)
    except ValueError as exc:
        raise HTTPException(400, f"{name} is width,height") from exc
    if not (0 <= vw <= MAX_VIEWPORT and 0 <= vh <= MAX_VIEWPORT) or not (vw or vh):
        raise HTTPException(400, f"{name} is width,height between 1 and {MAX_VIEWPORT}")
    return vw, vh


def _quality(text: str | None) -> int:
    if text is None:
        return 90
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise HTTPException(400, "quality is 1 to 100")
    return int(text)


def _rendered(web: _Web, user: User, rows: list[Instance], opts: Render, *,
              frame: int = 0, many: bool = False) -> Response:
    """One instance rendered (the middle one of several for a thumbnail), or each of
    ``rows`` as a part of a multipart answer (study and series rendered)."""
    def one(row: Instance) -> bytes:
        path = _file(web, row)
        with decoding():
            return render(_read(path), opts, frame)

    _count_reads(web, user, len(rows) if many else 1, rows[0].study_uid)
    if many:  # rendered one at a time while the answer streams
        parts: list[tuple[str, Body]] = [(opts.media, _later(one, r)) for r in rows]
        web.audit("image.view", rows[0].study_uid, {"instances": len(rows)}, user.name)
        return _multipart_response(parts, opts.media)
    row = rows[len(rows) // 2]
    data = one(row)
    web.audit("image.view", row.sop_uid, {"frame": frame + 1}, user.name)
    return Response(data, media_type=opts.media)


def _later(fn: Callable[[Instance], bytes], row: Instance) -> Callable[[], bytes | None]:
    """A part rendered when the stream reaches it; an instance that cannot be rendered
    (no pixel data, undecodable) is left out of a study or series answer, and logged."""
    def make() -> bytes | None:
        try:
            return fn(row)
        except HTTPException as exc:
            log.warning("rendered: instance %s left out (%s)", row.sop_uid, exc.detail)
            return None
    return make


# -- WADO-URI ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UriRequest:
    """A checked WADO-URI request (PS3.18 9.1.2)."""

    study: str
    series: str
    sop: str
    media: str
    syntax: str | None
    frame: int
    opts: Render


def _uri_media(value: str) -> str:
    for item in _split(value, ","):
        kind = _split(item, ";")[0].lower()
        if kind in (DICOM, "image/jpeg", "image/png"):
            return kind
        if kind in ("*/*", "image/*"):
            return "image/jpeg"
    raise _not_acceptable("contentType is application/dicom, image/jpeg or image/png")


def _positive(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    top = MAX_VIEWPORT if name in ("rows", "columns") else 1_000_000
    if not text.isdigit() or not 1 <= int(text) <= top:
        raise HTTPException(400, f"{name} is a whole number from 1 to {top}")
    return int(text)


def parse_uri(query: dict[str, str]) -> UriRequest:
    """Check a WADO-URI query: 400 on a missing or invalid parameter, 406 on a content
    type not offered."""
    if query.get("requestType") != "WADO":
        raise HTTPException(400, "requestType=WADO is required")
    uids = []
    for name in ("studyUID", "seriesUID", "objectUID"):
        if not query.get(name):
            raise HTTPException(400, f"{name} is required")
        uids.append(_uid(query[name]))
    if query.get("anonymize", "").lower() == "yes":
        raise HTTPException(400, "anonymize=yes is not offered by this gateway")
    media = _uri_media(query.get("contentType", "image/jpeg"))
    syntax = query.get("transferSyntax")
    if syntax is not None:
        _uid(syntax)
    centre, width = query.get("windowCenter"), query.get("windowWidth")
    if (centre is None) != (width is None):
        raise HTTPException(400, "windowCenter and windowWidth go together")
    win = _window_param(f"{centre},{width}") if centre is not None else None
    rows, columns = _positive(query.get("rows"), "rows"), _positive(query.get("columns"),
                                                                      "columns")
    viewport = (columns or 0, rows or 0) if rows or columns else None
    frame = _positive(query.get("frameNumber"), "frameNumber") or 1
    quality = _quality(query.get("imageQuality"))
    return UriRequest(*uids, media, syntax, frame - 1,
                      Render(media if media != DICOM else "image/jpeg", win, viewport, quality))


def _wado_uri(web: _Web, user: User, request: Request) -> Response:
    req = parse_uri(dict(request.query_params))
    row = find(web, user, req.study, req.series, req.sop)[0]
    path = _file(web, row)
    if req.media != DICOM:
        return _rendered(web, user, [row], req.opts, frame=req.frame)
    with decoding():
        stored, lossy, has_pixels = _header_facts(path)
    chosen = choose_syntax(stored, lossy, has_pixels, [req.syntax or EXPLICIT_LE])
    if chosen is None:
        raise _not_acceptable(f"the object is stored in {stored} and cannot be sent "
                              f"losslessly in {req.syntax}")
    _count_reads(web, user, 1, req.sop)
    if chosen == stored:
        return StreamingResponse(_file_chunks(path), media_type=DICOM)
    return Response(transcode(path, chosen), media_type=DICOM)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            yield chunk


# -- routes --------------------------------------------------------------------------------------

def add_wado_routes(app: FastAPI, web: _Web) -> None:  # noqa: C901 - one closure per route
    """WADO-RS under ``/dicom-web`` and WADO-URI at ``/wado``."""
    reader = web.role("radiologist")
    base = "/dicom-web/studies/{study}"
    series_path = base + "/series/{series}"
    instance_path = series_path + "/instances/{sop}"

    @app.get(base)
    def wado_study(study: str, request: Request, user: User = Depends(reader)) -> Response:
        return _retrieve(web, user, find(web, user, study), request, study)

    @app.get(series_path)
    def wado_series(study: str, series: str, request: Request,
                    user: User = Depends(reader)) -> Response:
        return _retrieve(web, user, find(web, user, study, series), request, series)

    @app.get(instance_path)
    def wado_instance(study: str, series: str, sop: str, request: Request,
                      user: User = Depends(reader)) -> Response:
        return _retrieve(web, user, find(web, user, study, series, sop), request, sop)

    @app.get(base + "/metadata")
    def study_metadata(study: str, request: Request, user: User = Depends(reader)) -> Response:
        return _metadata_response(web, user, find(web, user, study), request)

    @app.get(series_path + "/metadata")
    def series_metadata(study: str, series: str, request: Request,
                        user: User = Depends(reader)) -> Response:
        return _metadata_response(web, user, find(web, user, study, series), request)

    @app.get(instance_path + "/metadata")
    def instance_metadata(study: str, series: str, sop: str, request: Request,
                          user: User = Depends(reader)) -> Response:
        return _metadata_response(web, user, find(web, user, study, series, sop), request)

    @app.get(instance_path + "/bulkdata/{tag}")
    def bulkdata(study: str, series: str, sop: str, tag: str, request: Request,
                 user: User = Depends(reader)) -> Response:
        if not _TAG.match(tag):
            raise HTTPException(400, "a bulk data tag is eight hexadecimal digits")
        row = find(web, user, study, series, sop)[0]
        path = _file(web, row)
        _count_reads(web, user, 1, sop)
        with decoding():
            ds = _read(path)
            if int(tag, 16) == PIXEL_DATA:
                return _whole_pixel_data(ds, request)
            return _bulk_response(ds, int(tag, 16), request)

    @app.get(instance_path + "/frames/{frames}")
    def frames(study: str, series: str, sop: str, frames: str, request: Request,
               user: User = Depends(reader)) -> Response:
        numbers = parse_frames(frames)
        row = find(web, user, study, series, sop)[0]
        path = _file(web, row)
        _count_reads(web, user, max(1, len(numbers) // 100), sop)  # a big series, frame by frame
        with decoding():
            return frames_response(_read(path), numbers, request)

    for suffix, thumb in (("/rendered", False), ("/thumbnail", True)):
        _add_rendered(app, web, reader, base, series_path, instance_path, suffix, thumb)

    @app.get("/wado")
    def wado_uri(request: Request, user: User = Depends(reader)) -> Response:
        return _wado_uri(web, user, request)


def _whole_pixel_data(ds: Dataset, request: Request) -> Response:
    """Pixel data as bulk data: native, one octet-stream part holding every frame (the
    value of native pixel data); compressed and asked for as stored, a part per frame."""
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data")
    info = pixel_info(ds)
    frames = list(range(1, info.frames + 1))
    choice = choose_frames(parse_accept(request.headers.get("accept")), _syntax(ds))
    if choice.stored:
        return frames_response(ds, frames, request)
    data = b"".join(_native_frames(ds, info, frames))
    ctype = f"{OCTET}; transfer-syntax={EXPLICIT_LE}"
    if not choice.multipart:
        return Response(data, media_type=ctype)
    return _multipart_response([(ctype, data)], OCTET)


def _add_rendered(app: FastAPI, web: _Web, reader: Callable[..., User], base: str,
                  series_path: str, instance_path: str, suffix: str, thumb: bool) -> None:
    """The rendered (or thumbnail) resources of study, series, instance and frame."""

    @app.get(base + suffix, name=f"study{suffix}")
    def study_image(study: str, request: Request, user: User = Depends(reader)) -> Response:
        return _rendered(web, user, find(web, user, study), render_options(
            request, thumbnail=thumb), many=not thumb)

    @app.get(series_path + suffix, name=f"series{suffix}")
    def series_image(study: str, series: str, request: Request,
                     user: User = Depends(reader)) -> Response:
        return _rendered(web, user, find(web, user, study, series), render_options(
            request, thumbnail=thumb), many=not thumb)

    @app.get(instance_path + suffix, name=f"instance{suffix}")
    def instance_image(study: str, series: str, sop: str, request: Request,
                       user: User = Depends(reader)) -> Response:
        return _rendered(web, user, find(web, user, study, series, sop),
                         render_options(request, thumbnail=thumb))

    @app.get(instance_path + "/frames/{frame}" + suffix, name=f"frame{suffix}")
    def frame_image(study: str, series: str, sop: str, frame: str, request: Request,
                    user: User = Depends(reader)) -> Response:
        numbers = parse_frames(frame)
        if len(numbers) != 1:
            raise HTTPException(400, "one frame is rendered at a time")
        return _rendered(web, user, find(web, user, study, series, sop),
                         render_options(request, thumbnail=thumb), frame=numbers[0] - 1)
