"""Versioned, content-addressed datasets: snapshot a folder and its labels, diff two versions.

A manifest lists every image with the SHA-256 of its file and of its decoded pixels (so a
re-encoded file with the same pixels reads as "header/encoding changed", a single changed
pixel as "pixels changed"), every label row with its own hash, and a dataset hash over all
of it: two manifests with the same dataset hash describe the same data. A manifest may be
signed with a radguard key (the same X.509 keys that sign DICOM), names its parent version,
and records who made it and when. Unreadable files are listed, not fatal.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from radguard.concurrency import map_ordered
from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes, read_json_object

if TYPE_CHECKING:
    from radguard.provenance.keys import Signer
    from radguard.provenance.trust import TrustStore

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetDiff",
    "DatasetError",
    "Manifest",
    "diff_manifests",
    "image_files",
    "load_image",
    "load_labels",
    "load_manifest",
    "snapshot",
]

FORMAT = "radguard-dataset/1"
IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ""}


class DatasetError(RadguardError):
    """A dataset, its labels or its manifest cannot be used."""


# -- reading images and labels ---------------------------------------------------------------

def image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every candidate image under ``root`` (DICOM, PNG, JPEG, TIFF, BMP; extension-less
    files are tried as DICOM), sorted; hidden files and folders are skipped."""
    base = Path(root)
    if not base.exists():
        raise DatasetError(f"{base}: no such folder")
    if not base.is_dir():
        raise DatasetError(f"{base}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath, name)
            if not name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)
    return sorted(found)


def load_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, Any]:
    """Pixels (all frames for DICOM) and the DICOM dataset (None for raster images)."""
    from radguard.dicom.io import read_dataset
    from radguard.dicom.pixels import pixel_array
    from radguard.images import is_dicom_path, read_for_analysis

    if is_dicom_path(path):
        ds = read_dataset(path)
        return pixel_array(ds), ds
    return read_for_analysis(path), None


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-256 over shape, dtype and values: equal pixels, equal digest, whatever the file."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def load_labels(path: str | os.PathLike[str], key: str | None = None
                ) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """A CSV of labels: (key column, columns, rows by key). The key column names the image
    (relative path or file name); by default ``file``/``path``/``image`` or the first column."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError as exc:
        raise DatasetError(f"{p}: label file not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{p}: cannot read labels ({exc})") from exc
    if not columns:
        raise DatasetError(f"{p}: the label file is empty")
    if key is None:
        key = next((c for c in ("file", "path", "image", "filename") if c in columns), columns[0])
    if key not in columns:
        raise DatasetError(f"{p}: no column {key!r} (columns: {', '.join(columns)})")
    by_key: dict[str, dict[str, str]] = {}
    for n, row in enumerate(rows, 2):
        if None in row:
            raise DatasetError(f"{p}: line {n} has more fields than the header")
        k = (row.get(key) or "").strip()
        if not k:
            raise DatasetError(f"{p}: line {n} has an empty {key!r}")
        if k in by_key:
            if by_key[k] == row:
                continue  # an exact repeat carries no new information
            raise DatasetError(f"{p}: {key} {k!r} appears twice with different values "
                               f"(line {n})")
        by_key[k] = {c: (row.get(c) or "") for c in columns}
    return key, columns, by_key


# -- manifests ---------------------------------------------------------------------------------

def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8")


def _sha(value: object) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


@dataclass
class Manifest:
    """One version of a dataset. ``images`` and ``labels`` are keyed by relative path / key."""

    name: str
    images: dict[str, dict[str, Any]]
    labels: dict[str, dict[str, Any]]
    label_key: str | None = None
    label_columns: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    labels_without_image: list[str] = field(default_factory=list)
    created: str = ""
    actor: str = ""
    parent: str | None = None
    root: str = ""
    signature: dict[str, str] | None = None
    labels_file: str = ""  # the label CSV it was made from (absolute), for ``verify``

    @property
    def dataset_hash(self) -> str:
        """SHA-256 over the content: images, pixels, labels, unreadable files."""
        return _sha(self._content())

    @property
    def version(self) -> str:
        """Short form of the dataset hash, for file names and messages."""
        return self.dataset_hash[:12]

    def _content(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "label_key": self.label_key,
                "label_columns": self.label_columns, "unreadable": self.unreadable}

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to disk (signature last, over everything before it)."""
        body = {"format": FORMAT, "name": self.name, "created": self.created,
                "actor": self.actor, "parent": self.parent, "root": self.root,
                "dataset_hash": self.dataset_hash, **self._content(),
                "unlabelled": self.unlabelled,
                "labels_without_image": self.labels_without_image}
        if self.labels_file:  # only when known: older manifests' signatures still hold
            body["labels_file"] = self.labels_file
        if self.signature:
            body["signature"] = self.signature
        return body

    def signed_bytes(self) -> bytes:
        """What a signature covers: the canonical JSON of everything but the signature."""
        body = self.to_dict()
        body.pop("signature", None)
        return _canonical(body)

    def sign(self, signer: Signer) -> None:
        """Sign with a radguard key; the certificate chain travels with the manifest."""
        data = self.signed_bytes()
        if isinstance(signer.key, rsa.RSAPrivateKey):
            value, algorithm = signer.key.sign(data, padding.PKCS1v15(), hashes.SHA256()), \
                "rsa-pkcs1v15-sha256"
        elif isinstance(signer.key, ec.EllipticCurvePrivateKey):
            value, algorithm = signer.key.sign(data, ec.ECDSA(hashes.SHA256())), "ecdsa-sha256"
        else:
            raise DatasetError("manifests can be signed with RSA or ECDSA keys only")
        chain = [signer.certificate, *signer.chain]
        self.signature = {
            "algorithm": algorithm,
            "certificates": "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                                    for c in chain),
            "value": base64.b64encode(value).decode(),
        }

    def signer_certificate(self) -> x509.Certificate | None:
        """The signing certificate, if the manifest is signed."""
        if not self.signature:
            return None
        return x509.load_pem_x509_certificates(self.signature["certificates"].encode())[0]

    def check_signature(self, trust: TrustStore | None = None) -> str:
        """Raise DatasetError unless the signature holds (and chains to ``trust`` if given);
        returns the signer's description."""
        from radguard.provenance.keys import describe_subject

        if not self.signature:
            raise DatasetError(f"manifest {self.version} is not signed")
        try:
            certs = x509.load_pem_x509_certificates(self.signature["certificates"].encode())
            value = base64.b64decode(self.signature["value"], validate=True)
            key = certs[0].public_key()
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(value, self.signed_bytes(), padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(value, self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
            else:
                raise DatasetError("the manifest's signing key is neither RSA nor ECDSA")
        except InvalidSignature as exc:
            raise DatasetError(f"manifest {self.version}: the signature does not match its "
                               "content (the manifest was changed after signing)") from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise DatasetError(f"manifest {self.version}: the signature block is "
                               f"malformed ({exc})") from exc
        if trust is not None:
            signed_at = dt.datetime.fromisoformat(self.created) if self.created else \
                dt.datetime.now(dt.UTC)
            result = trust.validate(certs[0], signed_at, certs[1:])
            if not result.trusted:
                raise DatasetError(f"manifest {self.version}: signer not trusted "
                                   f"({result.reason})")
        return describe_subject(certs[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader never sees half a manifest)."""
        p = Path(path)
        atomic_write_bytes(p, json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()
                           + b"\n", durable=False)
        return p


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest and check that its content matches its dataset hash and, if signed,
    its signature; any mismatch is a DatasetError saying which."""
    p = Path(path)
    raw = read_json_object(p, "manifest", DatasetError)
    if raw.get("format") != FORMAT:
        raise DatasetError(f"{p}: not a radguard dataset manifest")
    try:
        m = Manifest(
            name=str(raw["name"]), images=dict(raw["images"]), labels=dict(raw["labels"]),
            label_key=raw.get("label_key"), label_columns=list(raw.get("label_columns", [])),
            unreadable=dict(raw.get("unreadable", {})),
            unlabelled=list(raw.get("unlabelled", [])),
            labels_without_image=list(raw.get("labels_without_image", [])),
            created=str(raw.get("created", "")), actor=str(raw.get("actor", "")),
            parent=raw.get("parent"), root=str(raw.get("root", "")),
            signature=raw.get("signature"), labels_file=str(raw.get("labels_file") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{p}: manifest is missing or has malformed fields ({exc})") from exc
    if m.dataset_hash != raw.get("dataset_hash"):
        raise DatasetError(f"{p}: the manifest's content does not match its dataset hash "
                           "(it was edited after it was written)")
    if m.signature:
        try:
            m.check_signature()
        except DatasetError as exc:
            raise DatasetError(f"{p}: {exc}") from exc
    return m


def _hash_one(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    try:
        data = path.read_bytes()
        entry["size"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        pixels, _ = load_image(path)
        entry["pixels"] = pixel_digest(pixels)
    except RadguardError as exc:
        entry["error"] = str(exc).replace(str(path), path.name)
    except (OSError, ValueError, MemoryError) as exc:
        entry["error"] = f"{path.name}: {type(exc).__name__}: {exc}"
    return entry


def snapshot(root: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None, *,
             label_key: str | None = None, parent: Manifest | None = None,
             actor: str = "", workers: int = 1,
             progress: Callable[[int], None] | None = None) -> Manifest:
    """Hash every image under ``root`` and every label row; unreadable files are listed."""
    base = Path(root)
    files = image_files(base)
    if not files:
        raise DatasetError(f"{base}: no image files found")
    images: dict[str, dict[str, Any]] = {}
    unreadable: dict[str, str] = {}
    for path, entry in zip(files, map_ordered(_hash_one, files, workers), strict=True):
        rel = path.relative_to(base).as_posix()
        if "error" in entry:
            unreadable[rel] = entry.pop("error")
        images[rel] = entry
        if progress:
            progress(1)
    key: str | None
    columns: list[str]
    rows: dict[str, dict[str, str]]
    key, columns, rows = (None, [], {})
    if labels is not None:
        key, columns, rows = load_labels(labels, label_key)
    label_entries = {k: {"row": row, "hash": _sha(row)} for k, row in rows.items()}
    matched = _match_labels(images, rows) if rows else {}
    return Manifest(
        name=base.resolve().name, images=images, labels=label_entries, label_key=key,
        label_columns=columns, unreadable=unreadable,
        unlabelled=sorted(p for p in images if p not in matched) if rows else [],
        labels_without_image=sorted(set(rows) - set(matched.values())),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), actor=actor,
        parent=parent.dataset_hash if parent else None, root=str(base.resolve()),
        labels_file=str(Path(labels).resolve()) if labels is not None else "")


def _match_labels(images: Iterable[str], rows: dict[str, Any]) -> dict[str, str]:
    """image path -> label key, by relative path first, then by file name."""
    out: dict[str, str] = {}
    for rel in images:
        if rel in rows:
            out[rel] = rel
        elif (name := rel.rsplit("/", 1)[-1]) in rows:
            out[rel] = name
    return out


def labels_by_image(manifest: Manifest) -> dict[str, dict[str, str]]:
    """Each image's label row (images without a row are left out)."""
    rows = {k: v["row"] for k, v in manifest.labels.items()}
    return {img: rows[key] for img, key in _match_labels(manifest.images, rows).items()}


# -- diff --------------------------------------------------------------------------------------

@dataclass
class DatasetDiff:
    """What changed from ``old`` to ``new``."""

    old: str
    new: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)
    pixels_changed: list[str] = field(default_factory=list)
    file_changed: list[str] = field(default_factory=list)  # same pixels, other bytes
    relabelled: list[dict[str, Any]] = field(default_factory=list)
    labels_added: list[str] = field(default_factory=list)
    labels_removed: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Nothing changed."""
        return self.old == self.new

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "identical": self.identical}

    def summary(self) -> list[str]:
        """One line per kind of change, for people."""
        lines = [f"{self.old[:12]} -> {self.new[:12]}"]
        if self.identical:
            return [*lines, "identical"]
        for label, items in (("added", self.added), ("removed", self.removed),
                             ("moved", [f"{a} -> {b}" for a, b in self.moved]),
                             ("pixels changed", self.pixels_changed),
                             ("file changed, same pixels", self.file_changed),
                             ("relabelled", [_describe_relabel(r) for r in self.relabelled]),
                             ("label rows added", self.labels_added),
                             ("label rows removed", self.labels_removed)):
            if items:
                lines.append(f"{label}: {len(items)}")
                lines.extend(f"  {x}" for x in items[:20])
                if len(items) > 20:
                    lines.append(f"  ... and {len(items) - 20} more")
        return lines


def _describe_relabel(r: dict[str, Any]) -> str:
    changes = ", ".join(f"{c}: {o!r} -> {n!r}" for c, (o, n) in r["changes"].items())
    return f"{r['key']}: {changes}"


def diff_manifests(old: Manifest, new: Manifest) -> DatasetDiff:
    """Added, removed, moved, modified and relabelled entries between two versions."""
    d = DatasetDiff(old.dataset_hash, new.dataset_hash)
    gone = sorted(set(old.images) - set(new.images))
    fresh = sorted(set(new.images) - set(old.images))
    by_hash = {old.images[p].get("sha256"): p for p in gone}
    for p in fresh:
        src = by_hash.pop(new.images[p].get("sha256"), None)
        if src is not None:
            d.moved.append((src, p))
        else:
            d.added.append(p)
    d.removed = sorted(by_hash.values())
    for p in sorted(set(old.images) & set(new.images)):
        a, b = old.images[p], new.images[p]
        if a.get("sha256") == b.get("sha256"):
            continue
        if a.get("pixels") and a.get("pixels") == b.get("pixels"):
            d.file_changed.append(p)
        else:
            d.pixels_changed.append(p)
    for k in sorted(set(old.labels) & set(new.labels)):
        if old.labels[k]["hash"] != new.labels[k]["hash"]:
            a, b = old.labels[k]["row"], new.labels[k]["row"]
            changes = {c: (a.get(c), b.get(c)) for c in sorted(set(a) | set(b))
                       if a.get(c) != b.get(c)}
            d.relabelled.append({"key": k, "changes": changes})
    d.labels_added = sorted(set(new.labels) - set(old.labels))
    d.labels_removed = sorted(set(old.labels) - set(new.labels))
    return d


def default_manifest_path(manifest: Manifest, folder: str | os.PathLike[str] = ".") -> Path:
    """``<folder>/<name>-<version>.manifest.json``: the name says which content it holds."""
    return Path(folder) / f"{manifest.name}-{manifest.version}.manifest.json"


def resolve_images(manifest: Manifest, root: str | os.PathLike[str] | None = None
                   ) -> Sequence[tuple[str, Path]]:
    """(relative path, absolute path) of every readable image, under ``root`` or the
    snapshot's own root."""
    base = Path(root or manifest.root)
    if not base.is_dir():
        raise DatasetError(f"{base}: the dataset folder is not there")
    return [(rel, base / rel) for rel in sorted(manifest.images)
            if rel not in manifest.unreadable]
