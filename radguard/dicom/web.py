"""A small DICOMweb client (PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Standard library only (urllib), so workers and the gateway need nothing more. Credentials come
from the URL (``http://user:password@host/dicom-web``) as HTTP Basic, or from a bearer token;
they are never printed: :func:`redact` strips them from anything shown to people.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from radguard.errors import RadguardError

__all__ = ["DicomWebClient", "DicomWebError", "InstanceRef", "is_dicomweb_url", "redact"]

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


def _value(item: dict, tag: str) -> str:
    return str(item[tag]["Value"][0])


def split_multipart(data: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related body: (headers, content) each. Strict: a body that does
    not follow the boundary rules raises DicomWebError."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    if not content_type.lower().startswith("multipart/related") or not match:
        raise DicomWebError(f"not a multipart/related answer ({content_type or 'no type'})")
    delimiter = b"--" + match.group(1).strip().encode()
    chunks = data.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise DicomWebError("malformed multipart body (missing boundaries)")
    parts = []
    for chunk in chunks[1:-1]:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise DicomWebError("malformed multipart part (no header end)")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts
