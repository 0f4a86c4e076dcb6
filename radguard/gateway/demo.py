"""``radguard demo``: the gateway on the embedded default with a batch of real radiographs.

Builds a small hospital with every layer of the gateway switched on: a CA, a DX room key and a
paediatric room key (signatures), a watermark key (every room watermarks at acquisition), and
a drift monitor whose reference is 300 adult chest radiographs from ``../shared/data/cxr-nih``.
Then it sends, over C-STORE and STOW-RS: intact signed radiographs; one whose patient name was
edited after signing; one labelled Synthetic Data = YES; one unsigned from a room that must
sign; a watermarked, unsigned one whose pixels were altered after acquisition (a patch of lung
pasted over another: the watermark shows where); and paediatric radiographs from a second site
(``../shared/data/cxr-kermany``), which the adult chest model was not trained for - the
monitor raises a new-scanner alarm at once and drift alarms after a few studies. It prints
where every image landed and the worklist address with a freshly made admin login.
"""

from __future__ import annotations

import csv
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.uids import new_uid
from radguard.errors import RadguardError
from radguard.gateway.studyview import brief

__all__ = ["ADULT", "MARKER", "PAEDIATRIC", "DemoHospital", "fresh_workdir", "prepare_images",
           "run_gateway_demo", "send_batch"]

def _shared() -> Path:
    """``$RADGUARD_SHARED_DATA``, else ``../shared/data`` from here or from the repository."""
    import os

    candidates = [Path(os.environ["RADGUARD_SHARED_DATA"])] if "RADGUARD_SHARED_DATA" in \
        os.environ else []
    candidates += [Path("../shared/data"), Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((c for c in candidates if (c / "cxr-nih").is_dir()), candidates[0])


SHARED = _shared()
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
REFERENCE_STUDIES = 300  # adult chest radiographs the drift monitor learns "normal" from
PAEDIATRIC_STUDIES = 8  # the second site's batch: enough for its drift alarms to fire


@dataclass(frozen=True)
class _Site:
    """Where a radiograph was taken: what its DICOM header says about the equipment."""

    folder: str  # in ../shared/data
    manufacturer: str
    station: str
    institution: str


ADULT = _Site("cxr-nih", "radguard demo (pixels: NIH ChestX-ray14)", "DX Room 3",
              "Demo Hospital")
PAEDIATRIC = _Site("cxr-kermany", "radguard demo (pixels: Kermany paediatric)",
                   "Paediatric DX 1", "Demo Children's Hospital")


def _dx_header(row: dict[str, str], site: _Site) -> Dataset:
    """A DX image's header for one labelled radiograph (pixels added separately)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    prefix = "NIH" if site is ADULT else "PAED"
    ds.PatientName = f"{prefix}^{row['patient_id']}"
    ds.PatientID = f"{prefix}{row['patient_id']}"
    ds.PatientSex = row.get("sex", "")
    ds.PatientBirthDate = ""
    ds.ViewPosition = row.get("view", "")
    ds.StudyDate, ds.StudyTime = "20261123", "080000"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Manufacturer = site.manufacturer
    ds.StationName = site.station
    ds.InstitutionName = site.institution
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelSpacing = ["0.7", "0.7"]
    return ds


def _pixels(site: _Site, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(SHARED / site.folder / "images" / row["file"]).convert("L"))


def _dx_from_jpeg(site: _Site, row: dict[str, str]) -> Dataset:
    """A real chest radiograph (8-bit JPEG) as a DX object with its patient's details."""
    ds = _dx_header(row, site)
    pixels = _pixels(site, row)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def _rows(site: _Site) -> list[dict[str, str]]:
    labels = SHARED / site.folder / "labels.csv"
    if not labels.exists():
        raise RadguardError(f"{labels}: the shared chest X-rays are needed for the demo")
    with labels.open(newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class DemoHospital:
    """The demo's keys, reference and images: everything the gateway is configured with."""

    files: dict[str, Path]  # name -> DICOM file, in sending order
    senders: dict[str, str]  # name -> the calling AE title it comes from
    ca: Path  # CA certificate signatures must chain to
    watermark_key: Path
    monitor_db: Path  # drift monitor with its fitted reference
    signers: dict[str, object]  # station name -> radguard.provenance.keys.Signer

    def config(self, data_dir: str | Path, **overrides: object) -> object:
        """The gateway configuration with every layer on (signature, watermark, forensics,
        triage, monitoring) and DX Room 3 obliged to sign."""
        from radguard.gateway import GatewayConfig

        settings: dict[str, object] = {
            "data_dir": str(data_dir), "trust": [str(self.ca)], "must_sign": ["DX_ROOM3"],
            "watermark_key": str(self.watermark_key), "monitor_db": str(self.monitor_db),
            "triage": {"DX": "chest", "CR": "chest"}, **overrides}
        return GatewayConfig(**settings).validate()  # type: ignore[arg-type]

    def acquire(self, site: _Site, row: dict[str, str], path: Path, *, sign: bool,
                edit: Callable[[Dataset], object] | None = None) -> Path:
        """A room's acquisition of one radiograph: watermark, then sign (the signature covers
        the watermarked pixels, which are what the room stores and sends). ``edit`` changes
        the image in between (an attack, or a label). Returns the file written."""
        from radguard.provenance.sign import sign_file
        from radguard.watermark import embed_dataset, load_key

        ds = embed_dataset(_dx_from_jpeg(site, row), load_key(self.watermark_key),
                           signer=site.station)
        if edit is not None:
            edit(ds)
        if not sign:
            write_dataset(ds, path)
            return path
        unsigned = path.with_name(path.name + ".unsigned")
        write_dataset(ds, unsigned)
        try:
            sign_file(unsigned, path, self.signers[site.station], profile="creator")
        finally:
            unsigned.unlink()
        return path


def _fit_monitor(path: Path, rows: list[dict[str, str]]) -> None:
    """The drift monitor's reference: image features and acquisition metadata of adult
    chest radiographs as the DX room stores them."""
    from radguard.monitoring import Monitor
    from radguard.monitoring.features import (
        IMAGE_FEATURES,
        dataset_features,
        metadata_features,
    )

    features, metadata = [], []
    for row in rows:
        ds = _dx_from_jpeg(ADULT, row)
        found = dataset_features(ds)
        features.append([found[n] for n in IMAGE_FEATURES])
        metadata.append(metadata_features(ds))
    if path.exists():
        path.unlink()
    monitor = Monitor(path)
    try:
        monitor.fit_reference(np.array(features), list(IMAGE_FEATURES), metadata=metadata)
    finally:
        monitor.close()


def _paste_patch(ds: Dataset) -> list[int]:
    """Copy a 48 x 48 patch of the left lung over the right one (a lesion moved, as a
    clone stamp would); returns the box [x0, y0, x1, y1] that changed."""
    px = ds.pixel_array.copy()
    h, w = px.shape
    y, xs, xd = h // 2 - 24, w // 4, w // 2 + w // 8
    px[y:y + 48, xd:xd + 48] = px[y:y + 48, xs:xs + 48]
    ds.PixelData = px.tobytes()
    return [xd, y, xd + 48, y + 48]


def prepare_images(workdir: Path, say: Callable[[str], None]) -> DemoHospital:
    """The demo's PKI, watermark key, drift reference and images."""
    from radguard.provenance.keys import (
        Identity,
        Signer,
        create_ca,
        create_signer,
        save_certificate,
    )
    from radguard.watermark import generate_key_file

    adult_rows, paed_rows = _rows(ADULT), _rows(PAEDIATRIC)
    pki = workdir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca("Demo Hospital Radiology CA", organization="Demo Hospital")
    signers: dict[str, object] = {}
    for site, serial in ((ADULT, "SN-0003"), (PAEDIATRIC, "SN-0101")):
        key, cert = create_signer(Identity(site.station, "device", site.institution, serial),
                                  ca_key=ca_key, ca_cert=ca_cert)
        signers[site.station] = Signer(key, cert, [ca_cert])
    save_certificate(ca_cert, pki / "ca.cert.pem")
    generate_key_file(pki / "watermark.key", force=True)
    rng = np.random.default_rng(11)
    picks = [int(i) for i in rng.choice(len(adult_rows), 9, replace=False)]
    say(f"fitting the drift monitor on {REFERENCE_STUDIES} adult chest radiographs ...")
    reference = [r for i, r in enumerate(adult_rows) if i not in picks]
    _fit_monitor(workdir / "monitor.db", reference[:REFERENCE_STUDIES])
    hospital = DemoHospital({}, {}, pki / "ca.cert.pem", pki / "watermark.key",
                            workdir / "monitor.db", signers)
    out = workdir / "images"
    out.mkdir(exist_ok=True)

    def acquire(site: _Site, row: dict[str, str], name: str, *, sign: bool, ae: str,
                edit: Callable[[Dataset], object] | None = None) -> None:
        path = out / f"{len(hospital.files):02d}.dcm"
        hospital.files[name] = hospital.acquire(site, row, path, sign=sign, edit=edit)
        hospital.senders[name] = ae

    for n, i in enumerate(picks[:5]):
        acquire(ADULT, adult_rows[i], f"signed chest {n + 1}", sign=True, ae="MODALITY")
    tampered = "tampered (edited after signing)"
    acquire(ADULT, adult_rows[picks[5]], tampered, sign=True, ae="MODALITY")
    ds = read_dataset(hospital.files[tampered])  # the seeds' attack
    ds.PatientName = "SOMEONE^ELSE"
    write_dataset(ds, hospital.files[tampered])

    def label_synthetic(ds: Dataset) -> None:  # a generated image that says so
        ds.SyntheticData = "YES"
        ds.PatientName = "SYNTHETIC^IMAGE"

    acquire(ADULT, adult_rows[picks[6]], "synthetic (labelled)", sign=False, ae="MODALITY",
            edit=label_synthetic)
    acquire(ADULT, adult_rows[picks[7]], "unsigned from DX Room 3", sign=False, ae="DX_ROOM3")
    acquire(ADULT, adult_rows[picks[8]], "pixels edited (watermarked)", sign=False,
            ae="WARD_DX", edit=_paste_patch)
    for n, row in enumerate(paed_rows[:PAEDIATRIC_STUDIES]):
        acquire(PAEDIATRIC, row, f"paediatric chest {n + 1}", sign=True, ae="PAED_DX")
    say(f"prepared {len(hospital.files)} watermarked images from ../shared/data/cxr-nih and "
        f"cxr-kermany (keys in {pki})")
    return hospital


def _send_dimse(port: int, paths: list[Path], calling_ae: str) -> int:
    from pydicom import dcmread
    from pynetdicom import AE

    from radguard.gateway.dimse import open_association

    ae = AE(ae_title=calling_ae)
    # as modalities that sign do: send in the file's own syntax (Explicit VR), because
    # converting 8-bit pixel data to Implicit VR (OB -> OW) breaks a PS3.15 signature
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = open_association(ae, "127.0.0.1", port, "RADGUARD")
    if not assoc.is_established:
        raise RadguardError("the demo could not connect to its own gateway")
    sent = 0
    try:
        for p in paths:
            status = assoc.send_c_store(dcmread(p))
            sent += int(getattr(status, "Status", 1) == 0)
    finally:
        assoc.release()
    return sent


def send_batch(gateway: object, hospital: DemoHospital, say: Callable[[str], None]) -> None:
    """Send the demo images, each from its room's calling AE title over C-STORE, except two
    signed ones that a technologist uploads over STOW-RS."""
    from radguard.dicom.web import DicomWebClient
    from radguard.gateway.auth import Users

    users = Users(gateway.store)  # type: ignore[attr-defined]
    users.add("demo-tech", "technologist", secrets.token_urlsafe(12))
    names = list(hospital.files)
    by_stow = [n for n in names if n.startswith("signed chest")][-2:]
    port = gateway.dicom.port  # type: ignore[attr-defined]
    sent = 0
    for ae in dict.fromkeys(hospital.senders.values()):  # rooms in order of appearance
        sent += _send_dimse(port, [hospital.files[n] for n in names
                                   if hospital.senders[n] == ae and n not in by_stow], ae)
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",  # type: ignore[attr-defined]
                            token=users.issue_token("demo-tech"))
    client.store([hospital.files[n].read_bytes() for n in by_stow])
    sent += len(by_stow)
    say(f"sent {sent} images: {len(names) - len(by_stow)} over C-STORE, {len(by_stow)} over "
        "STOW-RS")


# -- the demo's folder ------------------------------------------------------------------------

MARKER = ".radguard-demo"  # in a folder the demo made: what a reset may wipe
# what the demo writes there (the monitor's SQLite files included); a reset deletes these
# and nothing else
OWN = ("data", "images", "pki", "monitor.db", "monitor.db-wal", "monitor.db-shm",
       "monitor.db-journal")


def _made_by_demo(workdir: Path) -> bool:
    """The demo's own folder: it carries the marker, or (made before there was one) holds
    nothing but what the demo writes and the walkthrough's DICOM files."""
    if (workdir / MARKER).is_file():
        return True
    names = {p.name for p in workdir.iterdir()}
    return (workdir / "pki" / "ca.cert.pem").is_file() and all(
        n in OWN or n.endswith(".dcm") for n in names)


def fresh_workdir(workdir: Path, say: Callable[[str], None],
                  confirm: Callable[[str], bool] | None = None) -> None:
    """Start the demo afresh in ``workdir``: delete what an earlier demo run left there
    (its store, audit log, drift monitor, images and keys - :data:`OWN`, nothing else) and
    mark the folder as the demo's. A folder the demo did not make is touched only if
    ``confirm(question)`` says yes; without ``confirm`` it is refused (RadguardError)."""
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise RadguardError(f"{workdir} is not a folder the demo made: choose another "
                            "--workdir")
    present = [workdir / n for n in OWN if (workdir / n).exists() or (workdir / n).is_symlink()]
    if present and not _made_by_demo(workdir):
        question = (f"{workdir} was not made by the demo; delete "
                    f"{', '.join(p.name for p in present)} in it and start afresh?")
        if confirm is None or not confirm(question):
            raise RadguardError(f"{workdir} was not made by the demo: not wiped. Use --keep "
                                "to add to it, or choose another --workdir")
    for path in present:
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a link is removed, never followed
        else:
            shutil.rmtree(path)
    if present:
        say(f"started afresh: removed the earlier demo run's {', '.join(p.name for p in present)}"
            f" in {workdir} (--keep adds to it instead)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("radguard demo folder: `radguard demo` wipes what it made "
                                  "here on every run unless given --keep\n")


def run_gateway_demo(workdir: Path, say: Callable[[str], None], *, wait: bool = True,
                     dicom_port: int = 11112, http_port: int = 8080, reset: bool = True,
                     confirm: Callable[[str], bool] | None = None) -> bool:
    """Run the demo; with ``wait`` keep serving until Ctrl-C. True if every image landed
    where the policy says. ``reset``: a fresh store each run (:func:`fresh_workdir`, with
    ``confirm`` asked before a folder the demo did not make is touched); else the batch is
    added to what earlier runs stored."""
    from radguard.gateway import Gateway
    from radguard.gateway.auth import Users

    if reset:
        fresh_workdir(workdir, say, confirm)
    hospital = prepare_images(workdir, say)
    dicom_port, http_port = _free_or_any(dicom_port), _free_or_any(http_port)
    config = hospital.config(workdir / "data", dicom_port=dicom_port, http_port=http_port)
    gateway = Gateway(config)
    gateway.start()
    try:
        users = Users(gateway.store)
        password = secrets.token_urlsafe(12)
        users.add("demo-admin", "admin", password)
        say("layers: " + "; ".join(f"{k} {v}" for k, v in gateway.pipeline.layers().items()))
        send_batch(gateway, hospital, say)
        gateway.wait_idle(300)
        ok = _report(gateway, hospital.files, say)
        url = f"http://127.0.0.1:{gateway.http_port}/"
        say(f"\nworklist: {url}  (sign in as demo-admin / {password})")
        say(f"DICOM: C-STORE to RADGUARD@127.0.0.1:{gateway.dicom.port}; DICOMweb: "
            f"{url}dicom-web/ ; audit log: radguard audit verify --log "
            f"{workdir / 'data' / 'audit.jsonl'}")
        if not wait:
            say(f"(not serving: run `radguard demo --wait`, or `radguard serve --data-dir "
                f"{workdir / 'data'}` to browse these results)")
        if wait:
            say("serving until Ctrl-C ...")
            stop = threading.Event()
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
        return ok
    finally:
        gateway.stop()


def _free_or_any(port: int) -> int:
    """The asked-for port if it is free here, else 0 (the system picks one)."""
    import socket

    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


_EXPECTED = {"tampered": "quarantined", "synthetic": "rejected", "unsigned": "quarantined",
             "signed": "done", "pixels": "quarantined", "paediatric": "done"}


def _report(gateway: object, files: dict[str, Path], say: Callable[[str], None]) -> bool:
    store = gateway.store  # type: ignore[attr-defined]
    rows = {r.sop_uid: r for r in store.instances()}
    ok = True
    say(f"{'image':<34}{'state':<13}{'trust':<22}{'AI suspicion':<14}why")
    for name, path in files.items():
        row = rows.get(str(read_dataset(path, stop_before_pixels=True).SOPInstanceUID))
        if row is None:
            say(f"{name:<34}MISSING")
            ok = False
            continue
        expected = _EXPECTED[name.split()[0]]
        ok &= row.state == expected
        ai = f"{row.ai_suspicion}/10" if row.ai_suspicion else "-"
        why = brief((row.detail.get("reasons") or [""])[0], 60, "...")  # cut at a word
        say(f"{name:<34}{row.state:<13}{str(row.trust):<22}{ai:<14}{why}")
    say("every image landed where the policy says" if ok else "UNEXPECTED routing above")
    alarms = gateway.audit_log.recent(50, actions=("monitoring.alarm",))  # type: ignore[attr-defined]
    if alarms:
        say(f"drift monitor: {len(alarms)} alarm(s) in the audit log - " + "; ".join(
            f"{e.target} {e.details.get('feature')} {e.details.get('direction')}"
            for e in alarms[:4]))
    else:
        say("drift monitor: no alarms")
    return ok
