"""Gateway load benchmark: sustained instances/s and receive-to-worklist latency (p50/p99)
with 1, 4 and 10 concurrent C-STORE associations, next to Orthanc's own C-STORE ingest rate
for the same images and concurrency, measured in the same run (target: at least 0.5x
Orthanc with every check on).

Images: real chest radiographs from ../shared/data/cxr-nih as 512x512 DX objects, acquired
as the demo hospital's DX room does it (radguard.gateway.demo.DemoHospital.acquire):
watermarked, then signed by the room's device key. The gateway has every layer on: signature
verification against the CA, the watermark check with the hospital's key, the forensics scan,
the chest triage model and the drift monitor (fitted on 300 other NIH radiographs; each run
gets a fresh copy). The gateway runs as its own process (`radguard serve`), like Orthanc.

Senders (the same for both sides of a ratio): dcmtk ``storescu``, one process per association
(default; a C implementation that waits on its socket, as a modality's DICOM stack does), or
``--sender pynetdicom``: SCUs in this process. pynetdicom's requestor polls its socket every
millisecond on two threads per association, so ten idle associations alone burn about 0.8 of
a core here - on a two-core machine that is CPU taken from the receiver being measured, more
of it the longer a run lasts.

    python benchmarks/bench_gateway.py [--images 300] [--workers 2] [--sender storescu]

300 images by default: rates are sustained ones - at 50 instances/s a 120-image run lasts
2.4 s, and the start of every association and the latency of the last instances are then a
visible part of it (both sides send the same images). Orthanc is measured just before and
just after every radguard run, and each ratio uses the mean of the two: a shared machine's
speed drifts by several per cent within minutes, and a ratio of two rates measured minutes
apart carries that drift.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

SHARED = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start listening")


def make_images(folder: Path, n: int) -> tuple[list[Path], object]:
    """``n`` watermarked and signed DX radiographs, and the demo hospital they come from."""
    import csv

    from radguard.gateway.demo import ADULT, prepare_images

    hospital = prepare_images(folder / "demo", lambda _: None)
    rows = list(csv.DictReader(open(SHARED / "cxr-nih" / "labels.csv")))
    return [hospital.acquire(ADULT, rows[i], folder / f"img{i:04d}.dcm", sign=True)
            for i in range(n)], hospital


def send_storescu(port: int, aet: str, files: list[Path], associations: int) -> float:
    """Send every file with ``associations`` dcmtk storescu processes (one association
    each, its share of the files in order); seconds taken. Any failure stops the benchmark."""
    tool = next((t for t in ("/usr/bin/storescu", shutil.which("storescu")) if t
                 and Path(t).exists() and "pyenv" not in t and "bin/python" not in t), None)
    if tool is None:
        raise SystemExit("dcmtk storescu not found (apt-get install dcmtk), or use "
                         "--sender pynetdicom")
    shares = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    # --required: contexts for the files' SOP class only, uncompressed syntaxes (explicit VR
    # little endian first), as a modality proposes them
    procs = [subprocess.Popen([tool, "--required", "-aet", "BENCH", "-aec", aet, "127.0.0.1",
                               str(port), *map(str, share)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for share in shares if share]
    errors = [p.communicate()[1].decode(errors="replace") for p in procs]
    elapsed = time.perf_counter() - start
    failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode]
    if failed:
        raise SystemExit(f"{len(failed)} storescu run(s) failed: {failed[0][-1500:]}")
    return elapsed


def send_pynetdicom(port: int, aet: str, files: list[Path], associations: int) -> float:
    """Send every file over ``associations`` parallel associations; seconds taken. Any
    failed C-STORE stops the benchmark. The associations are opened with radguard's
    :func:`open_association`, which keeps pynetdicom's requestor from losing a response to
    its own reactor thread (that race used to stall a sender for its DIMSE timeout in about
    one run of 20)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    from radguard.gateway.dimse import open_association

    datasets = [dcmread(f) for f in files]
    shares = [datasets[i::associations] for i in range(associations)]
    failures = []

    def run(share: list) -> None:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(share[0].SOPClassUID, ExplicitVRLittleEndian)
        assoc = open_association(ae, "127.0.0.1", port, aet)
        if not assoc.is_established:
            failures.append("association refused")
            return
        for ds in share:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0:
                failures.append(f"0x{status.Status:04X}" if status else "no response")
                break
        if assoc.is_established:
            assoc.release()

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in shares if s]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} C-STOREs failed: {sorted(set(failures))}")
    return time.perf_counter() - start


def orthanc(folder: Path) -> tuple[subprocess.Popen, int]:
    import glob

    port, http = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "HttpPort": http, "DicomPort": port,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {"b": "b"},
              "Plugins": sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))[:1]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "o.json").write_text(json.dumps(config))
    proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(folder / "o.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "Orthanc")
    return proc, port


def orthanc_rate(folder: Path, files: list[Path], associations: int, sender: str) -> float:
    """Orthanc's C-STORE ingest rate for ``files`` (a fresh Orthanc in ``folder``)."""
    proc, port = orthanc(folder)
    try:
        return len(files) / SENDERS[sender](port, "ORTHANC", files, associations)
    finally:
        proc.terminate()
        proc.wait(30)


def known_real_scores(files: list[Path]) -> list[dict[str, float]]:
    """Both detectors' scores of the benchmark's own (real) radiographs: what a calibrated
    source's known-real history looks like (``--calibrated``)."""
    from radguard.forensics.scan import scan_file

    out = []
    for path in files:
        scan = scan_file(path)
        if scan.synthetic_score is not None and scan.tamper is not None and \
                scan.tamper.local_edit_score is not None:
            out.append({"synthetic": float(scan.synthetic_score),
                        "local_edit": float(scan.tamper.local_edit_score)})
    if not out:
        raise SystemExit("no detector scores for the benchmark images")
    return out


def calibrate(data: Path, scores: list[dict[str, float]], source: str = "BENCH/DX") -> None:
    """Give the gateway's store a calibrated ``source`` (2,000 known-real scores per
    detector, cycled from ``scores``), as a site has after its first 2,000 signed images:
    then the detectors run on 1 in ``sample_vouched`` signed images, not on all."""
    from radguard.forensics.calibration import SourceScores
    from radguard.gateway.store import Store

    store = Store(data)
    try:
        book = SourceScores(store)
        for i in range(2000):
            book.record(source, scores[i % len(scores)], item=f"bench-seed-{i}",
                        origin="bench")
        if source not in book.calibrated_sources():
            raise SystemExit(f"seeding did not calibrate {source}")
    finally:
        store.close()


def gateway_run(tmp: Path, files: list[Path], hospital: object, associations: int,
                workers: int, trust_signed: bool, check_processes: int,
                sender: str = "storescu", seed: list[dict[str, float]] | None = None
                ) -> dict[str, float]:
    from radguard.gateway.store import Store
    from radguard.monitoring import Monitor

    name = f"gw{associations}{'t' if trust_signed else 'f'}{check_processes}"
    data = tmp / name
    if seed is not None:
        calibrate(data, seed)
    port = free_port()
    monitor = Monitor(hospital.monitor_db)  # a fresh copy: every run observes the same studies
    monitor.copy(tmp / f"{name}.monitor.db").close()
    monitor.close()
    config = tmp / f"{name}.toml"
    config.write_text(f'data_dir = "{data}"\ndicom_port = {port}\nhttp_port = 0\n'
                      f'trust = ["{hospital.ca}"]\nworkers = {workers}\n'
                      f'watermark_key = "{hospital.watermark_key}"\n'
                      f'monitor_db = "{tmp / f"{name}.monitor.db"}"\n'
                      f'triage = {{ DX = "chest" }}\n'
                      f'trust_signed_pixels = {"true" if trust_signed else "false"}\n'
                      f'check_processes = {check_processes}\n')
    log = open(tmp / f"{name}.log", "w")  # the gateway's warnings, should a C-STORE fail
    proc = subprocess.Popen([sys.executable, "-m", "radguard.cli", "serve", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, proc, "radguard")
        start = time.perf_counter()
        receive = SENDERS[sender](port, "RADGUARD", files, associations)
        store = Store(data)
        while True:
            counts = store.counts()
            if not counts.get("queued") and not counts.get("processing"):
                break
            time.sleep(0.05)
        total = time.perf_counter() - start
        rows = store.instances()
        import datetime as dt

        lat = np.array([(dt.datetime.fromisoformat(r.processed_at)
                         - dt.datetime.fromisoformat(r.received_at)).total_seconds()
                        for r in rows])
        states = {s: sum(r.state == s for r in rows) for s in {r.state for r in rows}}
        missing = [r.sop_uid for r in rows if not every_layer_ran(r, detectors=not trust_signed)]
        if missing:
            raise SystemExit(f"{len(missing)} instance(s) did not pass every layer, e.g. "
                             f"{next(r.detail for r in rows if r.sop_uid == missing[0])}")
        return {"receive_rate": len(files) / receive, "rate": len(files) / total,
                "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                "states": states}
    except SystemExit:
        print((tmp / f"{name}.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


SENDERS = {"storescu": send_storescu, "pynetdicom": send_pynetdicom}


def every_layer_ran(row: object, *, detectors: bool) -> bool:
    """The signature verified, the watermark checked intact, the chest model scored and the
    drift monitor updated for this instance (what 'every check on' is measured with); with
    ``detectors``, the synthetic-image and tamper detectors scored it too."""
    detail, scan = row.detail, row.detail.get("scan", {})
    ran = (row.trust == "signed" and scan.get("watermark") == "intact"
           and isinstance(detail.get("triage"), dict)
           and isinstance(detail.get("monitoring"), list))
    if detectors:
        ran = ran and scan.get("synthetic_score") is not None and scan.get("tamper") is not None
    return ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sender", choices=sorted(SENDERS), default="storescu",
                        help="what sends the images to both Orthanc and radguard (default: "
                             "dcmtk storescu, one process per association)")
    parser.add_argument("--check-processes", type=int,
                        default=max(1, min(4, os.cpu_count() or 1)),
                        help="check processes for policies A<n>/B<n> (default: one per core, "
                             "at most 4; A/B: checks in-process)")
    parser.add_argument("--calibrated", action="store_true",
                        help="the sending source already calibrated (2,000 known-real scores "
                             "seeded): the steady state; default: a new source, whose every "
                             "signed image is scored until it is calibrated")
    parser.add_argument("--policies", default="A,B,An,Bn",
                        help="comma-separated subset of A, B, An, Bn (An/Bn: with the check "
                             "processes), e.g. --policies An for the default configuration only")
    args = parser.parse_args()
    wanted = {p.strip() for p in args.policies.split(",") if p.strip()}
    if not wanted or wanted - {"A", "B", "An", "Bn"}:
        parser.error("--policies: a comma-separated subset of A, B, An, Bn")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files, hospital = make_images(tmp / "images", args.images)
        seed = known_real_scores(files) if args.calibrated else None
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        print(f"{len(files)} watermarked and signed 512x512 DX chest radiographs ({mb:.2f} MB "
              f"each); gateway with every layer on - signature, watermark, forensics scan, "
              f"chest triage, drift monitor - {args.workers} pipeline workers; "
              f"{os.cpu_count()} cores")
        print("policy A: default - a trusted signature over the pixels skips the content "
              "detectors (synthetic image, copy-move, fill/splice); header checks run")
        print("policy B: trust_signed_pixels = false - every content detector on every image "
              "too (what every unsigned radiograph gets)")
        print(f"A/B: checks on the gateway's own threads (check_processes = 0); "
              f"A{args.check_processes}/B{args.check_processes}: checks in "
              f"{args.check_processes} separate process(es) (the gateway's default 'auto' is "
              "one per core, at most 4)")
        print(f"sender: {args.sender} (one association per "
              f"{'storescu process' if args.sender == 'storescu' else 'thread'})")
        print("every instance of every run is checked to have passed each layer (signature "
              "valid, watermark intact, triage scored, monitor updated)")
        print("source: " + ("calibrated (2,000 known-real scores seeded: detectors on 1 in 20 "
                            "signed images)" if seed else "new (not calibrated: detectors on "
                            "every signed image, to calibrate it)"))
        print(f"{'associations':>12}{'policy':>7}{'Orthanc/s':>11}{'radguard received/s':>21}"
              f"{'radguard checked/s':>20}{'ratio':>7}{'p50 s':>8}{'p99 s':>8}")
        for associations in (1, 4, 10):
            # Orthanc is measured before and after every radguard run and the ratio uses the
            # mean of the two: this machine's speed drifts by several per cent within minutes
            before = orthanc_rate(tmp / f"orthanc{associations}-0", files, associations,
                                  args.sender)
            n = args.check_processes
            runs = [(key, trust_signed, procs) for key, trust_signed, procs in
                    (("A", True, 0), ("B", False, 0), ("An", True, n), ("Bn", False, n))
                    if key in wanted]
            for k, (key, trust_signed, procs) in enumerate(runs, 1):
                policy = key.replace("n", str(n)) if procs else key
                r = gateway_run(tmp, files, hospital, associations, args.workers,
                                trust_signed, procs, args.sender, seed)
                after = orthanc_rate(tmp / f"orthanc{associations}-{k}", files, associations,
                                     args.sender)
                reference = (before + after) / 2
                print(f"{associations:>12}{policy:>7}{reference:>11.1f}"
                      f"{r['receive_rate']:>21.1f}{r['rate']:>20.1f}"
                      f"{r['rate'] / reference:>7.2f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
                      f"   {r['states']}  (Orthanc {before:.1f} before, {after:.1f} after)")
                before = after
        print("ratio = radguard checked/s (received, verified, checked, triaged, on the "
              "worklist) / Orthanc ingest/s (mean of the Orthanc runs just before and just "
              "after); target >= 0.5")


if __name__ == "__main__":
    main()
