"""A small DICOMweb client (PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Standard library only (urllib), so workers and the gateway need nothing more. Credentials come
from the URL (``http://user:password@host/dicom-web``) as HTTP Basic, or from a bearer token;
they are never printed: :func:`redact` strips them from anything shown to people.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, BinaryIO, cast

from radguard.errors import RadguardError

__all__ = ["DicomWebClient", "DicomWebError", "InstanceRef", "MultipartParser", "Part",
           "is_dicomweb_url", "redact", "split_multipart"]

DICOM_MEDIA = "application/dicom"


class DicomWebError(RadguardError):
    """The DICOMweb server is unreachable, refused the request or answered nonsense."""


def is_dicomweb_url(text: str) -> bool:
    """True for http(s) URLs (a DICOMweb service root)."""
    return text.startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL without user name and password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


@dataclass(frozen=True)
class InstanceRef:
    """Where one instance lives on the server."""

    study: str
    series: str
    instance: str

    @property
    def path(self) -> str:
        """The WADO-RS path below the service root."""
        return f"studies/{self.study}/series/{self.series}/instances/{self.instance}"


class DicomWebClient:
    """One DICOMweb service root."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DicomWebError(f"{redact(url)}: not an http(s) DICOMweb URL")
        self.root = redact(url).rstrip("/") + "/"
        self.timeout = timeout
        self.headers: dict[str, str] = {}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, *, accept: str, body: bytes | None = None,
                 content_type: str | None = None) -> tuple[bytes, str]:
        url = urllib.parse.urljoin(self.root, path)
        headers = {**self.headers, "Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise DicomWebError(f"{method} {redact(url)}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DicomWebError(f"{method} {redact(url)}: cannot connect ({reason})") from exc

    # -- QIDO-RS -------------------------------------------------------------------------------
    def search_instances(self, page: int = 500) -> Iterator[InstanceRef]:
        """Every instance on the server, page by page."""
        offset = 0
        while True:
            data, _ = self._request(
                "GET", f"instances?limit={page}&offset={offset}"
                "&includefield=0020000D&includefield=0020000E", accept="application/dicom+json")
            try:
                items = json.loads(data) if data.strip() else []
            except ValueError as exc:
                raise DicomWebError(f"{self.root}: QIDO answer is not JSON") from exc
            if not isinstance(items, list):
                raise DicomWebError(f"{self.root}: QIDO answer is not a list")
            for item in items:
                try:
                    yield InstanceRef(_value(item, "0020000D"), _value(item, "0020000E"),
                                      _value(item, "00080018"))
                except (KeyError, IndexError, TypeError) as exc:
                    raise DicomWebError(f"{self.root}: QIDO result without UIDs") from exc
            if len(items) < page:
                return
            offset += len(items)

    # -- WADO-RS -------------------------------------------------------------------------------
    def retrieve(self, ref: InstanceRef) -> bytes:
        """One instance as a Part 10 file, in the transfer syntax it was stored in."""
        data, content_type = self._request(
            "GET", ref.path,
            accept=f'multipart/related; type="{DICOM_MEDIA}"; transfer-syntax=*')
        parts = split_multipart(data, content_type)
        if len(parts) != 1:
            raise DicomWebError(f"{ref.path}: expected one instance, got {len(parts)} parts")
        return parts[0][1]

    # -- STOW-RS -------------------------------------------------------------------------------
    def store(self, files: list[bytes], study: str | None = None) -> bytes:
        """Send Part 10 files in one STOW-RS request; returns the server's JSON answer."""
        boundary = "radguard-" + secrets.token_hex(12)
        body = b"".join(f"--{boundary}\r\nContent-Type: {DICOM_MEDIA}\r\n\r\n".encode() + f
                        + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
        path = f"studies/{study}" if study else "studies"
        data, _ = self._request(
            "POST", path, accept="application/dicom+json", body=body,
            content_type=f'multipart/related; type="{DICOM_MEDIA}"; boundary={boundary}')
        return data


def _value(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def split_multipart(data: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related body: (headers, content) each. Strict: a body that does
    not follow the boundary rules raises DicomWebError."""
    parser = MultipartParser(content_type, lambda _headers: io.BytesIO())
    parser.feed(data)
    return [(part.headers, cast(io.BytesIO, part.sink).getvalue()) for part in parser.finish()]


@dataclass
class Part:
    """One part of a multipart body: its headers (lower-case names) and where its content
    went."""

    headers: dict[str, str]
    sink: BinaryIO
    size: int = 0


class _State(Enum):
    PREAMBLE = "preamble"
    BOUNDARY_LINE = "boundary line"
    HEADERS = "part headers"
    BODY = "part body"
    END = "end"


class MultipartParser:
    """multipart/related (RFC 2046) parsed as it arrives: ``feed`` chunks in any sizes, each
    part's content is written to the sink ``open_part(headers)`` returns (a file in a spool
    folder, or memory), ``close_part(part)`` is called as soon as the part's boundary is
    reached (so only one part file need be open), and ``finish`` checks the body ended
    properly. A large STOW-RS body is therefore never held whole; only a delimiter's length
    is kept back between chunks."""

    def __init__(self, content_type: str, open_part: Callable[[dict[str, str]], BinaryIO], *,
                 close_part: Callable[[Part], None] | None = None, max_parts: int = 10_000,
                 max_header_bytes: int = 16_384) -> None:
        match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
        if not content_type.lower().startswith("multipart/related") or not match:
            raise DicomWebError(f"not a multipart/related body ({content_type[:100] or 'no type'})")
        boundary = match.group(1).strip().encode("latin-1", "replace")
        if not 0 < len(boundary) <= 200:
            raise DicomWebError("multipart boundary must be 1-200 characters")
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # the first delimiter needs no line break before it
        self._state = _State.PREAMBLE
        self._open_part, self._close_part = open_part, close_part
        self.max_parts, self.max_header_bytes = max_parts, max_header_bytes
        self.parts: list[Part] = []

    def feed(self, data: bytes) -> None:
        """Consume the next chunk of the body."""
        if self._state is _State.END:
            return  # the epilogue is ignored
        self._buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Advance by one state; False when more data is needed."""
        buf, state = self._buf, self._state
        if state in (_State.PREAMBLE, _State.BODY):
            at = buf.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) - 1
                if len(buf) > keep:
                    if state is _State.BODY:
                        self._write(buf[:-keep])
                    del buf[:-keep]
                return False
            if state is _State.BODY:
                self._write(buf[:at])
                if self._close_part is not None:
                    self._close_part(self.parts[-1])
            del buf[:at + len(self._delimiter)]
            self._state = _State.BOUNDARY_LINE
            return True
        if state is _State.BOUNDARY_LINE:
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                self._state = _State.END
                buf.clear()
                return False
            end = buf.find(b"\r\n")
            if end < 0 or buf[:end].strip(b" \t"):  # only transport padding may follow
                if end >= 0 or len(buf) > 256:
                    raise DicomWebError("malformed multipart body (bad boundary line)")
                return False
            del buf[:end + 2]
            self._state = _State.HEADERS
            return True
        if state is _State.HEADERS:
            end = buf.find(b"\r\n\r\n") if not buf.startswith(b"\r\n") else -2
            if end == -1:
                if len(buf) > self.max_header_bytes:
                    raise DicomWebError("malformed multipart part (headers too long)")
                return False
            head = bytes(buf[:end]) if end > 0 else b""  # -2: a part without headers
            del buf[:end + 4]
            headers = {}
            for line in head.decode("latin-1").split("\r\n"):
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if len(self.parts) >= self.max_parts:
                raise DicomWebError(f"more than {self.max_parts} parts in one request")
            self.parts.append(Part(headers, self._open_part(headers)))
            self._state = _State.BODY
            return True
        return False

    def _write(self, data: bytearray) -> None:
        if data:
            part = self.parts[-1]
            part.sink.write(data)
            part.size += len(data)

    def finish(self) -> list[Part]:
        """The parts, once the closing boundary has been seen (else DicomWebError)."""
        if self._state is not _State.END:
            where = "missing boundaries" if self._state is _State.PREAMBLE else \
                f"ends in the {self._state.value}, no closing boundary"
            raise DicomWebError(f"malformed multipart body ({where})")
        return self.parts
