"""Scale-out benchmark (issue 29): instances/s for 1, 2 and 3 gateways on one PostgreSQL, and
how long the gateways take to recover from a database restart.

Each gateway is its own ``radguard serve --config`` process with a ``[cluster]`` table (own
gateway id and data folder, instance files in the database, short leases, a bounded
connection pool), ``check_processes = 0`` and ``workers`` worker threads; all of them share
one PostgreSQL server this benchmark starts (Debian's package, like the tests' fixture) and
forward to one Storage SCP in this process. Images: small synthetic secondary captures
(32 x 32), the same set in every run, each run on a fresh database. Senders: dcmtk
``storescu``, ``--associations`` processes per gateway (one association each), the images
split evenly across the gateways.

Throughput is end to end: from the first C-STORE to the moment the last instance is done
(checked and forwarded), measured in the database; the ratio is against the 1-gateway run of
the same invocation (the anchor). On a machine with fewer cores than gateways x (receiver +
workers) the ratio says how much the processes cost each other, not how a cluster of
machines scales.

Recovery: with 2 gateways under a light load, ``pg_ctl restart -m fast`` (every connection
cut); then, polling each gateway by turns, the seconds from the restart command to its first
accepted C-STORE and to its GET /health answering 200. Repeated ``--restarts`` times.

    python benchmarks/bench_cluster.py [--images 300] [--gateways 3] [--workers 2]
                                       [--associations 2] [--restarts 3]

Reuses the helpers of tests/gateway/test_cluster.py (gateway processes, images, the SCP)
and tests/conftest.py (the PostgreSQL server).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)


def settle(cluster, total: int, timeout: float) -> float:
    """Wait until ``total`` rows exist and none is in progress; the monotonic time then."""
    deadline = time.monotonic() + timeout
    while True:
        counts = cluster.counts()
        if sum(counts.values()) >= total and not any(
                counts.get(s) for s in ("queued", "processing", "forwarding")):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"not settled within {timeout:g} s: {counts}")
        time.sleep(0.05)


def throughput(pg, root: Path, n: int, files: list[Path], sops: dict, pacs, args) -> dict:
    """One run with ``n`` gateways: instances/s end to end and for intake alone."""
    from tests.gateway.test_cluster import Cluster, Sender

    url = pg.create_database(f"bench_{n}_{int(time.time())}")
    cluster = Cluster(root / f"run{n}", pg, url, n, forward=pacs.target)
    cluster.start()
    try:
        streams = n * args.associations
        before = len(pacs.received)
        start = time.monotonic()
        senders = [Sender(cluster.gateways[i % n], files[i::streams], sops)
                   for i in range(streams)]
        for s in senders:
            s.join()
        received = time.monotonic()
        acked = sum(len(s.acked) for s in senders)
        if acked != len(files):
            raise SystemExit(f"{n} gateway(s): {acked} of {len(files)} acknowledged: "
                             f"{senders[0].log[-1][-800:]}")
        done = settle(cluster, len(files), 600)
        attempts = cluster.query("SELECT max(attempts) FROM instances")[0][0]
        forwarded = Counter(sop for _, sop in pacs.received[before:])
    finally:
        cluster.stop()
    return {"gateways": n, "seconds": done - start, "rate": len(files) / (done - start),
            "intake_rate": len(files) / (received - start), "max_attempts": attempts,
            "double_forwards": sum(1 for c in forwarded.values() if c > 1)}


def recovery(pg, root: Path, files: list[Path], sops: dict, pacs, args) -> list[dict]:
    """Seconds from ``pg_ctl restart`` to each gateway's first accepted C-STORE and to its
    /health 200, ``args.restarts`` times, 2 gateways ingesting meanwhile."""
    from tests.gateway.conftest import small_images
    from tests.gateway.test_cluster import Cluster, Sender, send_one

    url = pg.create_database(f"bench_recovery_{int(time.time())}")
    cluster = Cluster(root / "recovery", pg, url, 2, forward=pacs.target)
    cluster.start()
    probes = list(small_images(root / "probes", 2 * args.restarts + 2, seed=9))
    out = []
    try:
        gws = cluster.gateways
        for r in range(args.restarts):
            load = [Sender(gws[i], files[i::2][: 60], sops, per_association=5, pause=0.1)
                    for i in range(2)]
            time.sleep(1.0)
            start = time.monotonic()
            pg.restart()
            restart_cmd = time.monotonic() - start
            stored: dict[str, float] = {}
            ready: dict[str, float] = {}
            deadline = start + 60
            while len(stored) + len(ready) < 4:
                for g in gws:
                    if g.id not in ready and g.health()[0] == 200:
                        ready[g.id] = time.monotonic() - start
                    # a probe is used up only when stored (a refused one is not)
                    if g.id not in stored and send_one(g, probes[-1]) == "Success":
                        probes.pop()
                        stored[g.id] = time.monotonic() - start
                if time.monotonic() > deadline:
                    raise SystemExit(f"restart {r + 1}: not back within 60 s: C-STORE "
                                     f"{stored}, /health {ready}")
                time.sleep(0.05)
            for s in load:
                s.join()
            out.append({"restart_command": restart_cmd, "first_store": max(stored.values()),
                        "health": max(ready.values())})
    finally:
        cluster.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--gateways", type=int, default=3, help="up to this many (from 1)")
    parser.add_argument("--workers", type=int, default=2, help="(the test module's: 2)")
    parser.add_argument("--associations", type=int, default=2, help="per gateway")
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    if args.workers != 2:
        raise SystemExit("--workers: the gateways here run the test module's settings "
                         "(workers = 2)")

    from tests.conftest import running_postgres
    from tests.gateway.conftest import small_images
    from tests.gateway.test_cluster import CLUSTER_SETTINGS, LEASE, POOL, Pacs

    if not CLUSTER_SETTINGS:
        print("note: this radguard has no [cluster] settings; gateways run without them")
    root = Path(tempfile.mkdtemp(prefix="radguard-bench-cluster-"))
    sops = small_images(root / "images", args.images, seed=1)
    files = sorted(sops)
    pacs = Pacs()
    print(f"{args.images} images (32x32 secondary captures), {args.associations} "
          f"association(s) per gateway, workers=2, check_processes=0, lease {LEASE:g} s, "
          f"db_pool {POOL}, {os.cpu_count()} cores")
    try:
        with running_postgres(max_connections=100) as pg:
            runs = []
            for n in range(1, args.gateways + 1):
                runs.append(throughput(pg, root, n, files, sops, pacs, args))
                r = runs[-1]
                print(f"{n} gateway(s): {r['rate']:6.1f} instances/s end to end "
                      f"({r['seconds']:.1f} s; intake {r['intake_rate']:.1f}/s; max "
                      f"attempts {r['max_attempts']}, double forwards "
                      f"{r['double_forwards']})  ratio vs 1 gateway: "
                      f"{r['rate'] / runs[0]['rate']:.2f}x", flush=True)
            if args.restarts:
                found = recovery(pg, root, files, sops, pacs, args)
                for i, r in enumerate(found, 1):
                    print(f"database restart {i}: pg_ctl restart took "
                          f"{r['restart_command']:.1f} s; first accepted C-STORE on every "
                          f"gateway after {r['first_store']:.1f} s, /health ready after "
                          f"{r['health']:.1f} s", flush=True)
                print(f"recovery (median of {len(found)}): C-STORE "
                      f"{statistics.median(r['first_store'] for r in found):.1f} s, /health "
                      f"{statistics.median(r['health'] for r in found):.1f} s")
    finally:
        pacs.close()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
