"""Query benchmark: QIDO-RS and C-FIND latency at 10,000 studies, radguard next to Orthanc
(with its DICOMweb plugin) holding the same studies, measured in the same run (target:
radguard no slower than Orthanc, i.e. ratio <= 1).

Data: ``--studies`` studies (default 10,000; ``--quick``: 1,000), one tiny instance each
(8x8 MONOCHROME2 CT, Explicit VR Little Endian), generated here: 2 studies per patient,
names from 60 surnames x 25 given names, Study Dates spread over 2000-2024, modalities
CT/MR/US/DX/CR/MG in turn. Both servers get the same files.

Loading: Orthanc through its REST API (POST /instances, one keep-alive connection).
Radguard: by default straight into its store (``Store.ingest``, then the rows marked
``done`` with the verdict ``bench-direct``) before the gateway starts: what is measured is
the query path, which only reads the index that ``Store.ingest`` fills. ``--ingest stow``
sends them through STOW-RS and the whole pipeline instead (about 100 tiny objects/s on two
cores: under two minutes for 10,000; the answers are the same). The gateway runs as its own
process (``radguard serve``), as Orthanc does.

Queries (the same for both, through the same client; raw ``*`` in the URL, which Orthanc
1.10 needs - it does not percent-decode query values, see docs/conformance-orthanc.md):
by PatientID, by a one-year StudyDate range, by a PatientName wildcard (case-insensitive),
all studies with limit=100. C-FIND (Study Root, STUDY level, pynetdicom SCU on one open
association per server): the same keys except the "all" query (C-FIND has no limit). If
radguard does not answer C-FIND yet, that part is skipped with a message.

Each query runs ``--repeats`` times per server (after 3 warm-up runs), alternating the two
servers so drift hits both; the medians and the ratio radguard/Orthanc are printed. Absolute
times depend on this machine; the ratio is the figure (anchor: Orthanc in the same run).

    python benchmarks/bench_qido.py [--quick] [--studies N] [--repeats 20] [--ingest store|stow]
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

SURNAMES = ["Okafor", "Smith", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
            "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
            "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris",
            "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen",
            "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams",
            "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts",
            "Muller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
            "Schulz", "Hoffmann", "Koch", "Richter"]
GIVEN = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai",
         "Lea", "Max", "Nia", "Oto", "Pia", "Quin", "Rosa", "Sam", "Tia", "Uma", "Vic", "Wes",
         "Xia", "Yul"]
MODALITIES = ["CT", "MR", "US", "DX", "CR", "MG"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            if proc.poll() is not None:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.2)
    raise SystemExit(f"{what} did not start listening")


def study_values(i: int) -> dict[str, str]:
    patient = i // 2
    day = dt.date(2000, 1, 1) + dt.timedelta(days=(i * 7919) % 9125)
    return {"PatientID": f"P{patient:06d}",
            "PatientName": f"{SURNAMES[patient % len(SURNAMES)]}^"
                           f"{GIVEN[(patient // len(SURNAMES)) % len(GIVEN)]}",
            "StudyDate": day.strftime("%Y%m%d"), "StudyTime": f"{(i * 37) % 24:02d}{i % 60:02d}00",
            "AccessionNumber": f"A{i:07d}", "Modality": MODALITIES[i % len(MODALITIES)]}


def make_files(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    files = []
    for i in range(n):
        v = study_values(i)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CT_IMAGE
        ds.PatientName, ds.PatientID = v["PatientName"], v["PatientID"]
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.StudyDate, ds.StudyTime = v["StudyDate"], v["StudyTime"]
        ds.AccessionNumber, ds.StudyID = v["AccessionNumber"], str(i % 10000)
        ds.StudyDescription, ds.ReferringPhysicianName = "bench study", "Ref^Doc"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = v["Modality"], 1, 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (8, 8), dtype=np.uint16).tobytes()
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# -- Orthanc -------------------------------------------------------------------------------------


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, int, int]:
    http, dicom = free_port(), free_port()
    plugins = sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))[:1]
    if not shutil.which("Orthanc") or not plugins:
        raise SystemExit("Orthanc or its DICOMweb plugin not found: run scripts/install.sh")
    config = {"Name": "bench-qido", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "HttpPort": http, "DicomPort": dicom,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {"b": "b"},
              "DicomAlwaysAllowFind": True, "Plugins": plugins,
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "o.json").write_text(json.dumps(config))
    proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(folder / "o.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{http}/system", proc, "Orthanc")
    return proc, http, dicom


def load_orthanc(http: int, files: list[Path]) -> float:
    import requests

    session = requests.Session()
    session.auth, session.trust_env = ("b", "b"), False
    start = time.perf_counter()
    for p in files:
        r = session.post(f"http://127.0.0.1:{http}/instances", data=p.read_bytes(), timeout=60)
        r.raise_for_status()
    return time.perf_counter() - start


# -- radguard ------------------------------------------------------------------------------------


def load_radguard_store(data: Path, files: list[Path]) -> float:
    """Straight into the store, then marked done (what the pipeline does for a clean image,
    without the checks)."""
    from radguard.gateway.dimse import header_of
    from radguard.gateway.store import Store

    store = Store(data)
    start = time.perf_counter()
    for p in files:
        raw = p.read_bytes()
        store.ingest(raw, header_of(raw, p.name), source="bench", calling_ae="BENCH")
    now = dt.datetime.now(dt.UTC).isoformat()
    with store.transaction():
        store.execute("UPDATE instances SET state='done', verdict='bench-direct', "
                      "trust='unverified', details='{}', processed_at=? WHERE state='queued'",
                      (now,))
    took = time.perf_counter() - start
    store.close()
    return took


def add_users(data: Path) -> tuple[str, str]:
    """Tokens of a radiologist (queries) and a technologist (STOW-RS)."""
    from radguard.gateway.auth import Users
    from radguard.gateway.store import Store

    store = Store(data)
    users = Users(store)
    users.add("bench", "radiologist", "a bench password of some length")
    users.add("benchtech", "technologist", "a bench password of some length")
    tokens = users.issue_token("bench"), users.issue_token("benchtech")
    store.close()
    return tokens


def start_radguard(tmp: Path, data: Path) -> tuple[subprocess.Popen, int, int, object]:
    http, dicom = free_port(), free_port()
    config = tmp / "radguard.toml"
    config.write_text(f'data_dir = "{data}"\ndicom_port = {dicom}\nhttp_port = {http}\n'
                      'check_processes = 0\n[dicom]\nquery_callers = ["BENCH@127.0.0.1"]\n')
    log = open(tmp / "radguard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "radguard.cli", "serve", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=log)
    wait_http(f"http://127.0.0.1:{http}/login", proc, "radguard")
    return proc, http, dicom, log


def load_radguard_stow(http: int, token: str, files: list[Path], data: Path) -> float:
    from radguard.dicom.web import DicomWebClient
    from radguard.gateway.store import Store

    client = DicomWebClient(f"http://127.0.0.1:{http}/dicom-web/", token=token, timeout=300)
    start = time.perf_counter()
    for i in range(0, len(files), 50):
        client.store([p.read_bytes() for p in files[i:i + 50]])
    store = Store(data)
    while (c := store.counts()).get("queued") or c.get("processing"):
        time.sleep(0.5)
    took = time.perf_counter() - start
    print(f"  radguard states after the pipeline: {store.counts()}")
    store.close()
    return took


# -- timing --------------------------------------------------------------------------------------


def qido_queries(n: int) -> list[tuple[str, str]]:
    target = study_values(n // 2)
    return [
        ("PatientID exact", f"studies?PatientID={target['PatientID']}"),
        ("StudyDate one year", "studies?StudyDate=20100101-20101231"),
        ("PatientName okafor*", "studies?PatientName=okafor*"),
        ("all studies limit=100", "studies?limit=100"),
    ]


def cfind_queries(n: int) -> list[tuple[str, dict[str, str]]]:
    target = study_values(n // 2)
    return [
        ("PatientID exact", {"PatientID": target["PatientID"]}),
        ("StudyDate one year", {"StudyDate": "20100101-20101231"}),
        ("PatientName OKAFOR*", {"PatientName": "OKAFOR*"}),
        ("AccessionNumber exact", {"AccessionNumber": target["AccessionNumber"]}),
    ]


def time_qido(servers: dict[str, tuple[str, object]], path: str, repeats: int,
              fresh: bool = False) -> dict[str, tuple[float, int]]:
    """Median seconds and number of matches per server; ``fresh``: a new connection for
    every request (else one keep-alive connection per server)."""
    times: dict[str, list[float]] = {k: [] for k in servers}
    counts: dict[str, int] = {}
    for rep in range(repeats + 3):
        for name, (base, session) in servers.items():
            if fresh:
                session.close()  # the pool's connection goes: the next request opens one
            start = time.perf_counter()
            r = session.get(f"{base}/{path}", headers={"Accept": "application/dicom+json"},
                            timeout=120)
            took = time.perf_counter() - start
            r.raise_for_status()
            counts[name] = len(r.json()) if r.content else 0
            if rep >= 3:
                times[name].append(took)
    return {k: (statistics.median(v), counts[k]) for k, v in times.items()}


def find_identifier(keys: dict[str, str]):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
               "StudyDescription", "ModalitiesInStudy", "StudyInstanceUID"):
        setattr(ds, kw, keys.get(kw, ""))
    return ds


def open_find(port: int, called: str):
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    # pynetdicom writes a request in several sends: without TCP_NODELAY, Nagle plus the
    # peer's delayed ACK put a ~40 ms floor under every C-FIND, whoever answers
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def one_find(assoc, keys: dict[str, str]) -> tuple[float, int, int]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    start = time.perf_counter()
    pending, final = 0, -1
    for status, _ident in assoc.send_c_find(find_identifier(keys),
                                             StudyRootQueryRetrieveInformationModelFind):
        if not status:
            final = -2  # no answer in time / association lost
            break
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            pending += 1
        else:
            final = code
    return time.perf_counter() - start, pending, final


def time_find(assocs: dict[str, object], keys: dict[str, str], repeats: int
              ) -> dict[str, tuple[float, int]]:
    times: dict[str, list[float]] = {k: [] for k in assocs}
    counts: dict[str, int] = {}
    for rep in range(repeats + 3):
        for name, assoc in assocs.items():
            took, pending, final = one_find(assoc, keys)
            if final != 0:
                raise RuntimeError(f"{name}: C-FIND ended with status {final:#06x}")
            counts[name] = pending
            if rep >= 3:
                times[name].append(took)
    return {k: (statistics.median(v), counts[k]) for k, v in times.items()}


def print_rows(title: str, rows: list[tuple[str, dict[str, tuple[float, int]]]]) -> None:
    print(f"\n{title}")
    print(f"{'query':<24}{'matches rg/oc':>15}{'radguard ms':>13}{'Orthanc ms':>12}"
          f"{'ratio':>8}")
    for name, r in rows:
        (rg, n_rg), (oc, n_oc) = r["radguard"], r["orthanc"]
        flag = "" if n_rg == n_oc else "   <- different number of matches"
        print(f"{name:<24}{f'{n_rg}/{n_oc}':>15}{rg * 1000:>13.2f}{oc * 1000:>12.2f}"
              f"{rg / oc:>8.2f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 studies, 10 repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ingest", choices=("store", "stow"), default="store",
                        help="how radguard is loaded: straight into the store (default) or "
                             "STOW-RS through the whole pipeline (slow)")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="working folder of both servers (default /dev/shm)")
    args = parser.parse_args()
    n, repeats = (1000, 10) if args.quick else (args.studies, args.repeats)
    import requests

    with tempfile.TemporaryDirectory(prefix="bench-qido-", dir=args.dir) as name:
        tmp = Path(name)
        start = time.perf_counter()
        files = make_files(tmp / "files", n)
        print(f"{n} studies of one 8x8 CT instance each, generated in "
              f"{time.perf_counter() - start:.1f} s; {os.cpu_count()} cores; folder {tmp}")
        oc_proc, oc_http, oc_dicom = start_orthanc(tmp / "orthanc")
        rg_proc = log = None
        try:
            took = load_orthanc(oc_http, files)
            print(f"Orthanc loaded via REST in {took:.1f} s ({n / took:.0f}/s)")
            data = tmp / "radguard"
            token, tech_token = add_users(data)
            if args.ingest == "store":
                took = load_radguard_store(data, files)
                print(f"radguard loaded straight into its store in {took:.1f} s ({n / took:.0f}"
                      "/s; no checks - the query path is what is measured)")
            rg_proc, rg_http, rg_dicom, log = start_radguard(tmp, data)
            if args.ingest == "stow":
                took = load_radguard_stow(rg_http, tech_token, files, data)
                print(f"radguard loaded via STOW-RS + pipeline in {took:.1f} s "
                      f"({n / took:.1f}/s)")
            rg_session, oc_session = requests.Session(), requests.Session()
            rg_session.headers["Authorization"] = f"Bearer {token}"
            oc_session.auth = ("b", "b")
            rg_session.trust_env = oc_session.trust_env = False
            servers = {"radguard": (f"http://127.0.0.1:{rg_http}/dicom-web", rg_session),
                       "orthanc": (f"http://127.0.0.1:{oc_http}/dicom-web", oc_session)}
            rows = [(label, time_qido(servers, path, repeats)) for label, path in
                    qido_queries(n)]
            print_rows(f"QIDO-RS /studies, {n} studies, median of {repeats} (one keep-alive "
                       "connection per server, default return attributes of each)", rows)
            rows = [(label, time_qido(servers, path, repeats, fresh=True)) for label, path in
                    qido_queries(n)]
            print_rows(f"QIDO-RS /studies, {n} studies, median of {repeats} (a new connection "
                       "for every request)", rows)

            assocs = {"radguard": open_find(rg_dicom, "RADGUARD"),
                      "orthanc": open_find(oc_dicom, "ORTHANC")}
            if assocs["orthanc"] is None:
                print("\nC-FIND: Orthanc refused the association - part skipped")
            elif assocs["radguard"] is None:
                print("\nC-FIND: radguard does not accept Study Root C-FIND yet (association "
                      "refused or no presentation context) - part skipped")
            elif not assocs["radguard"].accepted_contexts or one_find(
                    assocs["radguard"], {"PatientID": "none"})[2] != 0:
                print("\nC-FIND: radguard does not answer Study Root C-FIND yet (no accepted "
                      "presentation context, or a failure status) - part skipped")
            else:
                try:
                    rows = [(label, time_find(assocs, keys, repeats)) for label, keys in
                            cfind_queries(n)]
                    print_rows(f"C-FIND Study Root, STUDY level, {n} studies, median of "
                               f"{repeats} (one association per server, pynetdicom SCU)", rows)
                except RuntimeError as exc:
                    print(f"\nC-FIND: {exc} - part skipped (radguard does not answer C-FIND "
                          "yet?)")
            for assoc in assocs.values():
                if assoc is not None:
                    assoc.release()
            print("\nratio = radguard median / Orthanc median; target <= 1 (no slower than "
                  "Orthanc)")
        finally:
            for proc in (rg_proc, oc_proc):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            if log is not None:
                log.close()


if __name__ == "__main__":
    main()
