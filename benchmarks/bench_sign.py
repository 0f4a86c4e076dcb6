"""Signing and verification throughput: radguard (one process) vs dcmsign (a process per file).

Input: the 15-bit RG1 computed radiograph from ../shared/data, decompressed to native
Explicit VR Little Endian (1955 x 1841 x 16 bit, about 7 MB), copied N times.

Anchors measured in the same run:
* dcmsign (dcmtk 3.6.7) signing and verifying each copy, one process per file, as a PACS
  script would call it;
* plain SHA-256 over the same file bytes in this process: the physical limit of signing,
  since every byte must be hashed once.

Targets (issue 2): radguard >= 5x dcmsign's files/s, and >= 50% of the SHA-256 MB/s.

    python benchmarks/bench_sign.py [--copies 30]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.concurrency import default_workers, map_ordered  # noqa: E402
from radguard.dicom import read_dataset, write_dataset  # noqa: E402
from radguard.provenance import (  # noqa: E402
    TrustStore,
    create_ca,
    create_signer,
    save_certificate,
    save_private_key,
    sign_file,
    sign_paths,
)
from radguard.provenance.keys import Identity, Signer  # noqa: E402
from radguard.provenance.verify import verify_paths  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "dicom" / "pylibjpeg-data" / "RG1_J2KI.dcm"


def _native_copy(dst: Path) -> None:
    ds = read_dataset(SOURCE)
    arr = ds.pixel_array
    ds.PixelData = arr.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_dataset(ds, dst, transfer_syntax=str(ExplicitVRLittleEndian))


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--dir", default=None,
                        help="Working folder (default: /dev/shm, so that the disk's write "
                             "bandwidth does not set the pace for either tool)")
    args = parser.parse_args()
    if shutil.which("dcmsign") is None:
        print("dcmsign not found: run scripts/install.sh", file=sys.stderr)
        return 2

    base = args.dir or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="bench_sign_", dir=base))
    try:
        template = work / "native.dcm"
        _native_copy(template)
        size = template.stat().st_size
        inputs = []
        for i in range(args.copies):
            p = work / "in" / f"{i:03d}.dcm"
            p.parent.mkdir(exist_ok=True)
            shutil.copy(template, p)
            inputs.append(p)

        ca_key, ca_cert = create_ca("Bench CA", algorithm="rsa2048")
        key, cert = create_signer(Identity("Bench DX"), ca_key=ca_key, ca_cert=ca_cert)
        save_private_key(key, work / "k.pem")
        save_certificate(cert, work / "c.pem")
        save_certificate(ca_cert, work / "ca.pem")
        signer = Signer(key, cert)
        trust = TrustStore([ca_cert])
        time.sleep(1.1)  # dcmsign rejects a certificate issued within the signing second
        sign_file(template, work / "warmup.dcm", signer)  # imports and caches, not timed
        os.sync()  # start both tools with no write-back of the inputs still in flight

        results = []
        for workers in (1, 2):
            rounds = [_measure(work, inputs, signer, trust, workers, r)
                      for r in range(args.rounds)]
            # best round per tool and operation: write-back of earlier rounds is noise
            best = [(op, min(r[i][1] for r in rounds), min(r[i][2] for r in rounds),
                     max(r[i][3] for r in rounds)) for i, (op, *_rest) in enumerate(rounds[0])]
            copy_mbps = best.pop()[3]
            best = [row + (copy_mbps,) for row in best]
            results.append((workers, best))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.copies
    mb = size / 1e6
    rate = {}  # (tool, op, parallelism) -> files/s ; ("sha", parallelism) -> MB/s
    for workers, rows in results:
        for op, rg_s, dt_s, sha_mbps, copy_mbps in rows:
            rate[("radguard", op, workers)] = n / rg_s
            rate[("dcmsign", op, workers)] = n / dt_s
            rate[("sha", workers)] = sha_mbps
            rate[("copy", workers)] = copy_mbps
    default = default_workers()
    print(f"input: RG1 CR, native 16-bit, {mb:.2f} MB per file, {n} copies, in {work.parent},"
          f" best of {args.rounds} rounds; {os.cpu_count()} cores")
    print("anchors: dcmsign (dcmtk 3.6.7), one process per file; plain SHA-256 (hashlib) of the")
    print("same bytes in memory, the physical limit of signing")
    print("second limit for signing: plain copies of the same files (every signer must write")
    print("a full signed copy, so it cannot outrun this machine's disk)")
    print(f"{'op':<7}{'parallel':>9}{'radguard f/s':>14}{'dcmsign f/s':>13}"
          f"{'radguard MB/s':>15}{'SHA-256 MB/s':>14}{'copy MB/s':>11}")
    for workers, _rows in results:
        for op in ("sign", "verify"):
            copy = f"{rate[('copy', workers)]:>11.0f}" if op == "sign" else f"{'':>11}"
            print(f"{op:<7}{workers:>9}{rate[('radguard', op, workers)]:>14.1f}"
                  f"{rate[('dcmsign', op, workers)]:>13.1f}"
                  f"{rate[('radguard', op, workers)] * mb:>15.0f}{rate[('sha', workers)]:>14.0f}"
                  + copy)

    def verdict(title: str, rg_par: int, dt_par: int, sha_par: int) -> None:
        print(title)
        for op in ("sign", "verify"):
            ratio = rate[("radguard", op, rg_par)] / rate[("dcmsign", op, dt_par)]
            share = rate[("radguard", op, rg_par)] * mb / rate[("sha", sha_par)]
            ok = ratio >= 5 and share >= 0.5
            print(f"  {op:<7} {ratio:4.1f}x dcmsign, {share:4.0%} of SHA-256 -> "
                  f"{'met' if ok else 'NOT met'}")

    verdict(f"issue target as stated (radguard batch, default {default} workers, one process; "
            "dcmsign one process per file; single-thread SHA-256; >= 5x and >= 50%):",
            default, 1, 1)
    verdict("stricter, per core (radguard 1 worker vs dcmsign 1 process vs SHA-256 1 thread):",
            1, 1, 1)
    verdict("stricter, equal parallelism (2 vs 2 processes vs SHA-256 on 2 threads):", 2, 2, 2)
    return 0


def _sha_rate(blobs: list[bytes], rounds: int, workers: int) -> float:
    work = [b for _ in range(rounds) for b in blobs]
    t0 = time.perf_counter()
    list(map_ordered(lambda b: hashlib.sha256(b).digest(), work, workers))
    return sum(len(b) for b in work) / (time.perf_counter() - t0) / 1e6


def _dcmsign(args: list[str]) -> None:
    subprocess.run(["dcmsign", "-q", *args], check=True)


def _copy_rate(work: Path, inputs: list[Path], workers: int, round_no: int) -> float:
    """MB/s of plain file copies (kernel copy, as radguard's splice writer uses): the rate at
    which this machine can write a signed copy at all, whatever the signer."""
    out = work / f"cp{workers}_{round_no}"
    out.mkdir()
    os.sync()
    t0 = time.perf_counter()
    list(map_ordered(lambda p: shutil.copyfile(p, out / p.name), inputs, workers))
    seconds = time.perf_counter() - t0
    total = sum(p.stat().st_size for p in inputs)
    shutil.rmtree(out)
    os.sync()
    return total / seconds / 1e6


def _measure(work: Path, inputs: list[Path], signer: Signer, trust: TrustStore,
             workers: int, round_no: int) -> list[tuple[str, float, float, float]]:
    blobs = [p.read_bytes() for p in inputs[:4]]
    sha_mbps = _sha_rate(blobs, max(1, len(inputs) // 4), workers)
    copy_mbps = _copy_rate(work, inputs, workers, round_no)

    out_rg = work / f"rg{workers}_{round_no}"
    t0 = time.perf_counter()
    results = sign_paths([work / "in"], out_rg, signer, workers=workers, profile="creator")
    rg_sign = time.perf_counter() - t0
    assert all(r.error is None for r in results)
    t0 = time.perf_counter()
    reports = list(verify_paths([out_rg], trust, workers=workers))
    rg_verify = time.perf_counter() - t0
    assert [r.status for r in reports] == ["valid"] * len(inputs)

    out_dt = work / f"dt{workers}_{round_no}"
    out_dt.mkdir()
    key, cert, ca = (str(work / n) for n in ("k.pem", "c.pem", "ca.pem"))
    t0 = time.perf_counter()
    list(map_ordered(lambda p: _dcmsign(["--sign", key, cert, "-pw", "+pc", "+m2", str(p),
                                         str(out_dt / p.name)]), inputs, workers))
    dt_sign = time.perf_counter() - t0
    t0 = time.perf_counter()
    list(map_ordered(lambda p: _dcmsign(["--verify", "+cf", ca, "+rc", str(out_dt / p.name)]),
                     inputs, workers))
    dt_verify = time.perf_counter() - t0
    shutil.rmtree(out_rg)
    shutil.rmtree(out_dt)
    os.sync()
    return [("sign", rg_sign, dt_sign, sha_mbps), ("verify", rg_verify, dt_verify, sha_mbps),
            ("copy", 0.0, 0.0, copy_mbps)]


if __name__ == "__main__":
    sys.exit(main())
