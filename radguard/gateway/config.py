"""Gateway settings: defaults that run with nothing configured, a TOML file for the rest.

Example ``radguard.toml``::

    data_dir = "radguard-data"
    db_url = ""                       # empty: SQLite in data_dir; postgresql://... for a
                                      # shared PostgreSQL index and queue
    ae_title = "RADGUARD"
    dicom_port = 11112
    http_port = 8080
    allowed_calling_aes = []          # empty: any calling AE may store
    trust = ["pki/ca.cert.pem"]       # CA certificates DICOM signatures must chain to
    must_sign = ["DX_ROOM3", "DX"]    # calling AE titles or modalities whose unsigned images
                                      # go to quarantine
    watermark_key = ""                # key file, to check embedded watermarks
    triage = { CR = "chest", DX = "chest", MG = "mammo" }
    monitor_db = ""                   # a fitted `radguard monitor init` database
    bulk_read_limit = 500             # instances per user per 10 minutes before an alarm
    validate_compressed_pixels = true # decode compressed pixel data before acknowledging, so a
                                      # corrupt stream is refused at the door (costs time)
    trust_signed_pixels = true        # a trusted signature over the pixels and everything
                                      # that changes what they show (pixels_covered) makes
                                      # the content detectors (synthetic image, copy-move,
                                      # fill / splice) unnecessary: they then run only to
                                      # calibrate the image's source ([forensics]); false:
                                      # on every image (the verdict of a vouched image never
                                      # depends on them)
    check_processes = "auto"          # run the checks (signature, forensics, triage) in this
                                      # many separate processes, so they do not share one
                                      # interpreter lock with receiving; "auto": one per core
                                      # (at most 4), none on a single core; 0: in-process
    ipv6_peer_prefix = 64             # IPv6 addresses that share this many leading bits
                                      # count as one peer (DICOM per-peer limits and
                                      # eviction, login counts): 64, as one host may use any
                                      # address of its /64; 128 where a /64 is a VLAN of
                                      # many hosts (then name an untrusted /64 in
                                      # dicom.peer_limits to count it as one)
    # HTTP side (web UI, DICOMweb, logins)
    stow_max_mb = 512                 # largest STOW-RS request (MiB); bigger: 413. The
                                      # body is spooled to data_dir, never held in memory
    login_max_failures = 5            # wrong passwords for one user name from one address
                                      # (an IPv6 /64), then that pair waits...
    login_max_failures_all_clients = 100  # ...for one name from all addresses together
                                      # (each adds at most login_max_failures), then the name
                                      # waits everywhere...
    login_max_failures_per_client = 20  # ...under any names from one address (NATs share one)
    login_backoff_seconds = 1.0       # first wait; doubles with every further failure; a
    login_backoff_max_seconds = 900.0 # locked name or address gets 429 + Retry-After
    trusted_proxies = []              # reverse proxies (IPs or networks) whose
                                      # X-Forwarded-For/-Proto are believed; empty: none
    http_max_connections = 256        # open HTTP connections; beyond them 503...
    http_max_per_client = 32          # ...and per client address (proxies exempt)
    http_header_seconds = 10.0        # a request's headers, and a login's or form's body,
                                      # must arrive within this (an idle or trickling
                                      # connection is closed; a stalled form gets 408)
    # ingest: how large an image may be inflated or decoded (dicom/limits.py), at the door
    # and in the check processes; larger ones are refused (C-STORE 0xC000, STOW failed
    # item) or, already stored, quarantined as unverifiable
    max_frame_pixels = 100000000      # Rows x Columns of one frame (a 4096 x 5120
                                      # mammogram is 21 million; 16384 x 16384 is refused)
    max_decoded_mb = 2048             # all frames decoded (Rows x Columns x frames x
                                      # samples x bytes): a large tomosynthesis is ~1 GB.
                                      # Native pixel data cannot expand: larger is taken
                                      # in, then quarantined as too large to check
    max_inflated_mb = 512             # a deflated data set (1.2.840.10008.1.2.1.99) inflated
    max_compression_ratio = 1000      # decoded / compressed size above 64 MiB decoded (real
                                      # images: 2-50); 0: no check
    decode_budget_mb = 1024           # inflated data sets and decoded pixels held at once by
                                      # one process (while a check or a store holds them), at
                                      # most one image more (one thread at a time may go
                                      # over); a larger image waits and then runs alone

    [forward]                         # the PACS; leave out to keep images here only
    dimse = "ORTHANC@127.0.0.1:4242"  # C-STORE target, AE@host:port
    stow = ""                         # or a DICOMweb root, e.g. http://user:pw@pacs/dicom-web/

    [results]                         # the triage model's results into the PACS
    write = false                     # true: for each image scored (triage) that goes
                                      # through, store a TID 1500 SR, a secondary-capture
                                      # saliency overlay and a fractional saliency SEG as
                                      # new instances of its study (needs triage). Off by
                                      # default: new series in clinical studies are a
                                      # site's decision (viewers, reading workflow)
    forward = true                    # send them to the PACS ([forward]) like the images

    [oidc]                            # also accept the identity provider's access tokens
    issuer = "https://sso.hospital.example/realms/radiology"   # 'iss' must be exactly this
    audience = "radguard"             # 'aud' must contain this
    jwks = "https://sso.hospital.example/realms/radiology/protocol/openid-connect/certs"
                                      # the provider's keys: https URL or a saved JWKS file
    role_claim = "realm_access.roles" # claim holding the user's roles (dotted path)
    username_claim = "preferred_username"
    roles = { "pacs-admin" = "admin", "radiology" = "radiologist" }  # provider -> radguard
                                      # role; radguard's own role names map to themselves

    [signatures]                      # which signature algorithms count: MD5 / SHA-1 MACs and
                                      # short keys are "weak" and quarantined with the reason
    allow_weak = false                # true: weak signatures count as valid (a legacy modality
                                      # that cannot be upgraded); still labelled weak-allowed
    min_rsa_bits = 2048               # shorter RSA signer keys are weak (1024-16384)
    min_ec_bits = 256                 # smaller elliptic-curve signer keys are weak (160-521)
    coverage = "image"                # what valid signatures must cover to vouch for an image
                                      # (badge signed, detectors skipped, must_sign met):
                                      # "image": what it shows and whose it is; "pixels":
                                      # what it shows only (devices that leave the patient's
                                      # identity unsigned; it can then be relabelled)

    [forensics]                       # per-source calibration of the content detectors
                                      # (forensics/calibration.py): images a signature or
                                      # the watermark vouches for are known-real evidence
                                      # about their source
    source = "calling_ae+modality"    # what a source is: "calling_ae", optionally with
                                      # "+station" (StationName) and/or "+modality" (a
                                      # router that mixes rooms and modalities under one AE
                                      # title pools unlike images: add +station)
    false_alarm_rate = 0.001          # per source: share of its real images the content
                                      # detectors may flag once it is calibrated (needs
                                      # 2/rate - 1 known-real images: 1,999)
    provisional_rate = 0.01           # with fewer, a source is judged at the best rate its
                                      # images allow down to this (199 images), alarms
                                      # 'suspicious' only; below, not judged at all
    uncalibrated = "worklist"         # unsigned images from a source not calibrated yet are
                                      # 'unverifiable': "worklist" (forwarded with the badge),
                                      # "quarantine", or "global" (judged at the detectors'
                                      # shipped thresholds instead)
    sample_vouched = 20               # once calibrated, the detectors still run on 1 in N
                                      # vouched images to keep it fresh (1: every one)
    window = 10000                    # the most recent known-real scores that count, per
                                      # source and detector

    [dicom]                           # what one DICOM peer may cost (gateway/acceptor.py)
    max_associations = 32             # associations at once; more get A-ASSOCIATE-RJ
                                      # (transient, local limit exceeded)
    max_per_ip = 16                   # open connections from one peer (an IPv4 address,
                                      # an IPv6 network of ipv6_peer_prefix bits),
                                      # negotiating ones included; more are closed unread
    max_per_ae = 16                   # associations from one peer with one calling AE
                                      # title; more: rejected
    peer_limits = { "10.0.0.5" = 32 } # addresses or networks (each counts as one peer,
                                      # all its addresses together) whose max_per_ip and
                                      # max_per_ae are this instead (a PACS, a NAT)
    connect_timeout = 15              # seconds from connect to a whole A-ASSOCIATE-RQ (TLS
                                      # handshake included)
    idle_timeout = 60                 # seconds of allowance; waiting for the peer uses it up
    min_rate_kib = 16                 # each KiB received adds 1/16 s (up to idle_timeout),
                                      # and each new instance stored idle_timeout / 2; a
                                      # resend only its bytes: silence or a trickle below
                                      # 16 KiB/s is dropped, a steady sender never. When
                                      # every association is taken, a new one evicts the
                                      # one of the peer holding the most that is furthest
                                      # behind its allowance (at least 5 s behind)
    max_association_time = 3600       # seconds, however busy; ends between messages (one
                                      # under way may take half as long again)
    max_data_set_mb = 4096            # largest data set; bigger: A-ABORT
    memory_per_message_mb = 32        # a data set is received in memory up to this size
    memory_budget_mb = 256            # and while all of them together fit in this; else it
                                      # is spooled to data_dir/incoming
    spool_budget_mb = 8192            # spool files of unanswered C-STOREs, all together;
                                      # beyond it: 0xA700
    min_free_mb = 1024                # C-STOREs get 0xA700 while less is free on data_dir's
                                      # filesystem (at most 5% of its size is kept free)
    # query/retrieve and storage commitment on the same port (gateway/qr.py)
    query_callers = []                # who may C-FIND/C-MOVE/C-GET: "AE" or "AE@address"
                                      # (an IP or network such as "10.1.2.0/24": the AE
                                      # title must come from there); empty: nobody - the
                                      # port answers C-STORE, C-ECHO and commitment only
    quarantine_viewers = []           # of those, who also finds and C-GETs quarantined
                                      # instances (never C-MOVEs them: a release is an
                                      # admin's decision); same form, e.g. "QA_WS@10.1.2.7"
    commitment_timeout = 600          # seconds a Storage Commitment request waits for its
                                      # instances' checks before reporting what is known

    [dicom.destinations]              # C-MOVE destinations, and where a Storage Commitment
    ORTHANC = "127.0.0.1:4242"        # result goes when its association has ended:
                                      # AE title = "host:port"

    [viewer]                          # the OHIF Viewer under /viewer/ (gateway/viewer.py)
    ohif_dist = ""                    # its prebuilt dist/ folder; empty: where
                                      # scripts/install.sh puts it (.cache/ohif/<version>/
                                      # dist in the source tree). Missing: the pages say
                                      # "viewer not installed" instead of linking to it

    [cluster]                         # several gateways on one PostgreSQL (db_url); see
                                      # docs/gateway.md#deployment
    gateway_id = ""                   # this gateway's name (claims, heartbeats, audit);
                                      # empty: host:ae_title:dicom_port
    objects = "folder"                # where instance files are: "folder" (objects_dir) or
                                      # "database" (in PostgreSQL: one database is all a
                                      # cluster needs)
    objects_dir = ""                  # empty: data_dir/objects. Gateways sharing a database
                                      # must share this folder (NFS...): a gateway whose
                                      # objects the others cannot read is refused at start
    lease_seconds = 30                # the longest a dead gateway's claims wait: then any
                                      # gateway takes the work over (heartbeat: a quarter)
    db_pool = 8                       # PostgreSQL connections of this gateway, at most
    cache_mb = 2048                   # local copies of objects kept in the database

    [readers]                         # reader studies and deepfake awareness in the browser
                                      # (gateway/readers.py, docs/reader-studies.md)
    image_root = ""                   # folders of case images must lie under it (resolved,
                                      # links followed); empty: cases are held instances only
    awareness_pool = ""               # folders cxr-*/real-* (real) and synthetic-* (one per
                                      # generator), e.g. "../shared/data"; empty: mode off
    awareness_items = 10              # images in one round (half synthetic)

    [notify]                          # when a monitoring episode opens or closes
                                      # (monitor_db; docs/monitoring.md): a webhook and/or
                                      # e-mail, sent in the background with retries
    webhook = ""                      # https://... receives the episode as JSON (POST)
    webhook_secret = ""               # adds X-Radguard-Signature: sha256=HMAC of the body
    email_to = []                     # recipients; needs email_from and smtp_host
    email_from = ""
    smtp_host = ""
    smtp_port = 25
    smtp_starttls = false             # required with smtp_user / smtp_password
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radguard.errors import RadguardError
from radguard.gateway.ratelimit import DEFAULT_IPV6_PREFIX
from radguard.postgres import is_postgres_url

if TYPE_CHECKING:
    from radguard.dicom.limits import DecodeLimits
    from radguard.provenance.policy import AlgorithmPolicy
    from radguard.provenance.profiles import Coverage

__all__ = ["OHIF_VERSION", "ConfigError", "DimseTarget", "GatewayConfig", "load_config"]

#: the OHIF Viewer release scripts/install.sh fetches (npm pack @ohif/app@OHIF_VERSION)
OHIF_VERSION = "3.13.2"
_DEFAULT_OHIF_DIST = Path(__file__).resolve().parents[2] / ".cache" / "ohif" / OHIF_VERSION / "dist"


class ConfigError(RadguardError):
    """The gateway configuration is invalid."""


@dataclass(frozen=True)
class DimseTarget:
    """A C-STORE peer: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DimseTarget:
        """From ``AE@host:port``."""
        try:
            ae, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            target = cls(ae.strip(), host.strip(), int(port))
        except ValueError as exc:
            raise ConfigError(f"forward.dimse {text!r}: expected AE@host:port") from exc
        _check_ae(target.ae_title, "forward.dimse AE title")
        if not 0 < target.port < 65536:
            raise ConfigError(f"forward.dimse port {target.port} out of range")
        return target


def _caller(entry: object, what: str) -> tuple[str, Any]:
    """An "AE" or "AE@address" entry as (AE title, network or None); ConfigError if not."""
    import ipaddress

    text = entry if isinstance(entry, str) else ""
    title, at, address = text.partition("@")
    _check_ae(title, what)
    if not at:
        return title, None
    try:
        return title, ipaddress.ip_network(address.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: {address!r} is not an IP address or "
                          "network") from exc


def _check_ae(title: str, what: str) -> None:
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        raise ConfigError(f"{what} {title!r}: 1-16 printable characters, no backslash")


@dataclass
class GatewayConfig:
    """Everything ``radguard serve`` needs; every field has a working default."""

    data_dir: str = "radguard-data"
    db_url: str = ""  # empty: SQLite in data_dir; or postgresql://user:pw@host/db
    ae_title: str = "RADGUARD"
    host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_port: int = 8080
    allowed_calling_aes: list[str] = field(default_factory=list)
    trust: list[str] = field(default_factory=list)
    must_sign: list[str] = field(default_factory=list)
    watermark_key: str = ""
    triage: dict[str, str] = field(default_factory=dict)
    monitor_db: str = ""
    forward_dimse: str = ""
    forward_stow: str = ""
    workers: int = 1
    bulk_read_limit: int = 500  # instances one user may retrieve in 10 minutes before an alarm
    validate_compressed_pixels: bool = True  # decode compressed pixels before acknowledging
    trust_signed_pixels: bool = True  # skip content detectors when trusted signatures vouch
                                      # for the image (pixels_covered; header checks still run)
    tls_cert: str = ""
    tls_key: str = ""
    check_processes: int | str = "auto"  # see check_process_count; 0: checks run on the
                                         # worker threads of the gateway process
    ipv6_peer_prefix: int = DEFAULT_IPV6_PREFIX  # IPv6 addresses sharing this many leading
                                                 # bits are one peer (DICOM limits, logins)
    oidc_issuer: str = ""  # [oidc]: accept the identity provider's access tokens too
    oidc_audience: str = ""
    oidc_jwks: str = ""
    oidc_role_claim: str = "roles"
    oidc_username_claim: str = "preferred_username"
    oidc_roles: dict[str, str] = field(default_factory=dict)
    # -- HTTP side: request bodies, logins, proxies (gateway/web.py, gateway/httpguard.py) --
    stow_max_mb: int = 512  # one STOW-RS request, MiB; spooled to disk, never held whole
    login_max_failures: int = 5  # wrong passwords for one user name from one address
    login_max_failures_all_clients: int = 100  # ...from all addresses (distributed guessing)
    login_max_failures_per_client: int = 20  # ...from one address under any names
    login_backoff_seconds: float = 1.0  # the first wait; doubles with each further failure
    login_backoff_max_seconds: float = 900.0  # the longest wait
    trusted_proxies: list[str] = field(default_factory=list)  # reverse proxies whose
                                     # X-Forwarded-For/-Proto name the client; empty: none
    http_max_connections: int = 256  # open HTTP connections (beyond: 503)
    http_max_per_client: int = 32  # ...from one client address (trusted proxies exempt)
    http_header_seconds: float = 10.0  # a request's headers (and a form's body) must
                                       # arrive within this
    # -- signatures: which algorithms count ([signatures]; provenance/policy.py) --
    signatures_allow_weak: bool = False  # weak (MD5/SHA-1, short keys) counts as valid
    signatures_min_rsa_bits: int = 2048  # shorter RSA signer keys are weak
    signatures_min_ec_bits: int = 256  # smaller elliptic-curve signer keys are weak
    signatures_coverage: str = "image"  # what signatures must cover to vouch for an image
    # -- forensics: per-source calibration ([forensics]; forensics/calibration.py) --
    forensics_source: str = "calling_ae+modality"  # calling_ae, optionally +station, +modality
    forensics_false_alarm_rate: float = 0.001  # per source, once calibrated
    forensics_provisional_rate: float = 0.01  # the loosest rate a source is judged at
    forensics_uncalibrated: str = "worklist"  # worklist / quarantine / global
    forensics_sample_vouched: int = 20  # 1 in N vouched images feeds a calibrated source
    forensics_window: int = 10_000  # known-real scores that count per source and detector
    # -- DICOM door: connections, time, memory per peer ([dicom]; gateway/acceptor.py) --
    dicom_max_associations: int = 32  # associations at once
    dicom_max_per_ip: int = 16  # open connections from one peer, negotiating ones included
    dicom_max_per_ae: int = 16  # associations from one peer with one calling AE title
    dicom_connect_timeout: float = 15.0  # seconds from connect to a whole A-ASSOCIATE-RQ
    dicom_idle_timeout: float = 60.0  # seconds of allowance without progress
    dicom_min_rate_kib: int = 16  # KiB/s received that keep the allowance full
    dicom_max_association_time: float = 3600.0  # seconds
    dicom_max_data_set_mb: int = 4096  # MiB in one data set (spooled to disk when large)
    dicom_memory_per_message_mb: int = 32  # MiB of one data set held in memory
    dicom_memory_budget_mb: int = 256  # MiB of data sets in memory, all associations
    dicom_spool_budget_mb: int = 8192  # MiB in spool files of unanswered C-STOREs
    dicom_min_free_mb: int = 1024  # MiB kept free on data_dir's filesystem (at most 5% of it)
    dicom_peer_limits: dict[str, int] = field(default_factory=dict)  # address or network
                                     # (one peer) -> its max_per_ip and max_per_ae
    dicom_destinations: dict[str, str] = field(default_factory=dict)  # AE title -> host:port
    dicom_query_callers: list[str] = field(default_factory=list)  # empty: nobody queries
    dicom_quarantine_viewers: list[str] = field(default_factory=list)  # see quarantined too
    dicom_commitment_timeout: float = 600.0  # seconds a commitment waits for the checks
    # -- ingest: decode and inflate limits (dicom/limits.py; gateway/dimse.py header_of) --
    max_frame_pixels: int = 100_000_000  # Rows x Columns of one frame
    max_decoded_mb: int = 2048  # all frames decoded, MiB
    max_inflated_mb: int = 512  # a deflated data set after inflating, MiB
    max_compression_ratio: int = 1000  # decoded / compressed bytes (above 64 MiB); 0: off
    decode_budget_mb: int = 1024  # MiB of inflates and decodes at once, per process
    # -- AI results into the PACS ([results]; triage/results.py) --
    results_write: bool = False  # store SR + SC + SEG per scored image that goes through
    results_forward: bool = True  # and forward them like the images
    # -- viewer: the OHIF Viewer's prebuilt files ([viewer]; gateway/viewer.py) --
    viewer_ohif_dist: str = ""  # empty: where scripts/install.sh puts them
    # -- several gateways on one PostgreSQL ([cluster]; docs/gateway.md#deployment) --
    cluster_gateway_id: str = ""  # empty: host:ae_title:dicom_port (unique on a host)
    cluster_objects: str = "folder"  # "folder" (objects_dir) or "database" (PostgreSQL)
    cluster_objects_dir: str = ""  # empty: data_dir/objects; a cluster: the shared folder
    cluster_lease_seconds: float = 30.0  # a dead gateway's claims taken over within it
    cluster_db_pool: int = 8  # PostgreSQL connections of this gateway, at most
    cluster_cache_mb: int = 2048  # local copies of objects kept in the database
    # -- reader studies in the browser ([readers]; gateway/readers.py) --
    readers_image_root: str = ""  # folders of case images must lie under it; empty: none
    readers_awareness_pool: str = ""  # cxr-*/real-* and synthetic-* folders; empty: off
    readers_awareness_items: int = 10  # images in one awareness round
    # -- notices of monitoring episodes ([notify]; monitoring/notify.py) --
    notify_webhook: str = ""
    notify_webhook_secret: str = ""
    notify_email_to: list[str] = field(default_factory=list)
    notify_email_from: str = ""
    notify_smtp_host: str = ""
    notify_smtp_port: int = 25
    notify_smtp_starttls: bool = False
    notify_smtp_user: str = ""
    notify_smtp_password: str = ""

    def notify_section(self) -> dict[str, object]:
        """The [notify] settings that are set, as monitoring.notify reads them."""
        defaults = {f.name: f.default for f in fields(GatewayConfig)
                    if f.name.startswith("notify_")}
        defaults["notify_email_to"] = []
        return {name.removeprefix("notify_"): getattr(self, name) for name in defaults
                if getattr(self, name) != defaults[name]}

    def notifiers(self) -> list[Any]:
        """The configured notifiers (none by default); a ConfigError when [notify] is
        wrong."""
        from radguard.monitoring.notify import NotifyError, notifiers_from_config

        try:
            return notifiers_from_config(self.notify_section())
        except NotifyError as exc:
            raise ConfigError(f"[notify]: {exc}") from exc

    def gateway_id(self) -> str:
        """This gateway's name in the cluster (claims, heartbeats, audit entries)."""
        if self.cluster_gateway_id:
            return self.cluster_gateway_id
        import socket

        name = f"{socket.gethostname()}:{self.ae_title}:{self.dicom_port}"
        return name if self.dicom_port else f"{name}:{os.getpid()}"  # port 0: any free one

    def _validate_cluster(self) -> None:
        """The [cluster] block."""
        number = functools.partial(self._number, table="cluster")
        number("lease_seconds", 2, 3600, whole=False)
        number("db_pool", 2, 1000)
        number("cache_mb", 16, 1 << 30)
        if not isinstance(self.cluster_gateway_id, str) or not re.fullmatch(
                r"[A-Za-z0-9._:@-]{0,64}", self.cluster_gateway_id):
            raise ConfigError(f"cluster.gateway_id {self.cluster_gateway_id!r}: up to 64 "
                              "letters, digits and . _ : @ -")
        if self.cluster_objects not in ("folder", "database"):
            raise ConfigError(f'cluster.objects {self.cluster_objects!r}: "folder" or '
                              '"database"')
        if self.cluster_objects == "database" and not self.db_url:
            raise ConfigError('cluster.objects = "database" keeps instance files in '
                              "PostgreSQL: it needs db_url")
        if self.cluster_objects == "database" and self.cluster_objects_dir:
            raise ConfigError('cluster.objects_dir is for objects = "folder"')

    def viewer_dist(self) -> Path:
        """The OHIF dist folder to serve under /viewer/ (it may be missing: not installed)."""
        return Path(self.viewer_ohif_dist) if self.viewer_ohif_dist else _DEFAULT_OHIF_DIST

    def decode_limits(self) -> DecodeLimits:
        """The ingest block as :class:`radguard.dicom.limits.DecodeLimits`."""
        from radguard.dicom.limits import DecodeLimits

        return DecodeLimits(max_frame_pixels=self.max_frame_pixels,
                            max_decoded_bytes=self.max_decoded_mb << 20,
                            max_inflated_bytes=self.max_inflated_mb << 20,
                            max_compression_ratio=self.max_compression_ratio,
                            decode_budget_bytes=self.decode_budget_mb << 20)

    def _validate_ingest(self) -> None:
        """The ingest block: positive whole numbers (the ratio may be 0, no check)."""
        for name in ("max_frame_pixels", "max_decoded_mb", "max_inflated_mb",
                     "decode_budget_mb"):
            self._number(name, 1, 1 << 40)
        self._number("max_compression_ratio", 0, 1 << 40)

    def _number(self, name: str, low: float, high: float, *, whole: bool = True,
                table: str = "") -> float:
        """The numeric setting ``name`` (of ``[table]``) as a float if it lies in [low, high]
        (a whole number unless ``whole`` is off); a ConfigError naming it as the TOML file
        does otherwise. The one range check of every block."""
        value = getattr(self, f"{table}_{name}" if table else name)
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            what = "a whole number" if whole else "a number"
            raise ConfigError(f"{f'{table}.' if table else ''}{name} {value!r}: {what} from "
                              f"{low} to {high}")
        return float(value)

    def oidc(self) -> Any:  # noqa: ANN401
        """The OpenID Connect settings, or None when [oidc] is not configured."""
        if not (self.oidc_issuer or self.oidc_audience or self.oidc_jwks):
            return None
        from radguard.gateway.oidc import OidcSettings

        return OidcSettings(self.oidc_issuer, self.oidc_audience, self.oidc_jwks,
                            self.oidc_role_claim, self.oidc_username_claim,
                            dict(self.oidc_roles))

    @property
    def check_process_count(self) -> int:
        """``check_processes`` as a number: "auto" is one per core this process may use, at
        most 4, and none on a single core (where separate processes only add overhead).
        Measured on 2 cores (benchmarks/RESULTS.md): two check processes checked 6-33% more
        instances per second than in-process checks in three runs with 1-10 associations."""
        if self.check_processes == "auto":
            cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)
            return min(4, cores) if cores >= 2 else 0
        return int(self.check_processes)

    def validate(self) -> GatewayConfig:
        """Raise ConfigError on any impossible value; returns self."""
        _check_ae(self.ae_title, "ae_title")
        for ae in self.allowed_calling_aes:
            _check_ae(ae, "allowed_calling_aes entry")
        for name in ("dicom_port", "http_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ConfigError(f"{name} {value!r}: a port number 0-65535 (0 picks a free one)")
        if self.forward_dimse:
            DimseTarget.parse(self.forward_dimse)
        if self.db_url and not is_postgres_url(self.db_url):
            raise ConfigError("db_url must be a postgresql:// URL (or empty for SQLite)")
        if self.forward_stow and not self.forward_stow.startswith(("http://", "https://")):
            raise ConfigError("forward.stow must be an http(s) DICOMweb root")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        for path in [*self.trust, self.watermark_key, self.tls_cert, self.tls_key]:
            if path and not Path(path).exists():
                raise ConfigError(f"{path}: no such file")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers: 1-64")
        self._number("ipv6_peer_prefix", 32, 128)  # shorter: a whole provider's addresses
        if self.check_processes != "auto" and (
                not isinstance(self.check_processes, int) or isinstance(self.check_processes, bool)
                or not 0 <= self.check_processes <= 32):
            raise ConfigError(f'check_processes {self.check_processes!r}: "auto" or 0-32')
        if not isinstance(self.oidc_roles, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.oidc_roles.items()):
            raise ConfigError("oidc.roles: a table of provider role = radguard role")
        oidc = self.oidc()
        if oidc is not None and oidc.problems():
            raise ConfigError("; ".join(oidc.problems()))
        self._validate_http()
        if not isinstance(self.viewer_ohif_dist, str):
            raise ConfigError("viewer.ohif_dist: a folder path (a string)")
        self.signature_policy()
        self.signature_coverage()
        self.calibration_policy()
        self._validate_dicom()
        self._validate_ingest()
        self._validate_results()
        self._validate_cluster()
        self._number("readers_awareness_items", 2, 200)
        for name in ("readers_image_root", "readers_awareness_pool"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"readers.{name.removeprefix('readers_')}: a folder path")
        self.notifiers()
        return self

    def _validate_results(self) -> None:
        """The [results] block: two switches; writing results needs a triage model."""
        for name in ("write", "forward"):
            value = getattr(self, f"results_{name}")
            if not isinstance(value, bool):
                raise ConfigError(f"results.{name} {value!r}: true or false")
        if self.results_write and not self.triage:
            raise ConfigError('results.write = true needs a triage model (e.g. triage = '
                              '{ DX = "chest" }): only scored images have results')

    def _validate_dicom(self) -> None:
        """The [dicom] block: connection, time, memory and disk limits."""
        import ipaddress

        number = functools.partial(self._number, table="dicom")

        most = number("max_associations", 1, 1024)
        number("max_per_ip", 1, most)
        number("max_per_ae", 1, most)
        number("connect_timeout", 0.1, 3600, whole=False)
        idle = number("idle_timeout", 0.1, 86400, whole=False)
        number("min_rate_kib", 1, 1 << 20)
        if number("max_association_time", 1, 7 * 86400, whole=False) < idle:
            raise ConfigError("dicom.max_association_time must not be below dicom.idle_timeout")
        if number("spool_budget_mb", 1, 1 << 30) < number("max_data_set_mb", 1, 1 << 20):
            raise ConfigError("dicom.spool_budget_mb must not be below dicom.max_data_set_mb")
        budget = number("memory_budget_mb", 0, 1 << 20)
        number("memory_per_message_mb", 0, budget)
        number("min_free_mb", 0, 1 << 30)
        if not isinstance(self.dicom_peer_limits, dict):
            raise ConfigError("dicom.peer_limits: a table of address or network = connections")
        for peer, limit in self.dicom_peer_limits.items():
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError as exc:
                raise ConfigError(f"dicom.peer_limits {peer!r}: not an IP address or "
                                  "network") from exc
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
                raise ConfigError(f"dicom.peer_limits {peer!r} = {limit!r}: a whole number "
                                  f"from 1 to max_associations ({most:g})")
        self._validate_qr()

    def _validate_qr(self) -> None:
        """Query/retrieve and commitment: AE title lists, destinations, the timeout."""
        for name in ("query_callers", "quarantine_viewers"):
            titles = getattr(self, f"dicom_{name}")
            if not isinstance(titles, list):
                raise ConfigError(f'dicom.{name}: a list of "AE" or "AE@address" entries')
            for entry in titles:
                _caller(entry, f"dicom.{name} entry")
        if not isinstance(self.dicom_destinations, dict):
            raise ConfigError('[dicom.destinations]: a table of AE title = "host:port"')
        for title in self.dicom_destinations:
            self.destination(title)
        self._number("commitment_timeout", 0, 86400, whole=False, table="dicom")

    def caller_in(self, name: str, ae_title: str, peer: str) -> bool:
        """Whether a calling AE title from address ``peer`` is in the ``[dicom]`` list
        ``name`` (query_callers, quarantine_viewers): its title listed, and - for an
        "AE@address" entry - the association coming from that address or network (an AE
        title is whatever the peer says; its address is harder to fake)."""
        import ipaddress

        for entry in getattr(self, f"dicom_{name}"):
            title, network = _caller(entry, f"dicom.{name} entry")
            if title != ae_title:
                continue
            if network is None:
                return True
            try:
                if ipaddress.ip_address(peer.split("%")[0]) in network:
                    return True
            except ValueError:
                continue
        return False

    def destination(self, ae_title: str) -> DimseTarget | None:
        """The [dicom.destinations] entry of ``ae_title`` (exact title), or None; a
        ConfigError if it is malformed."""
        text = self.dicom_destinations.get(ae_title)
        if text is None:
            return None
        what = f"dicom.destinations {ae_title!r}"
        _check_ae(ae_title, what)
        try:
            host, port = str(text).rsplit(":", 1)
            target = DimseTarget(ae_title, host.strip().strip("[]"), int(port))
        except ValueError as exc:
            raise ConfigError(f'{what} = {text!r}: expected "host:port"') from exc
        if not target.host or not 0 < target.port < 65536:
            raise ConfigError(f'{what} = {text!r}: expected "host:port", port 1-65535')
        return target

    def signature_policy(self) -> AlgorithmPolicy:
        """The [signatures] settings as the verifier's algorithm policy (ConfigError if one
        is out of range)."""
        from radguard.provenance.policy import AlgorithmPolicy, AlgorithmPolicyError

        try:
            return AlgorithmPolicy(allow_weak=self.signatures_allow_weak,
                                   min_rsa_bits=self.signatures_min_rsa_bits,
                                   min_ec_bits=self.signatures_min_ec_bits)
        except AlgorithmPolicyError as exc:
            raise ConfigError(f"signatures.{exc}") from exc

    def signature_coverage(self) -> Coverage:
        """[signatures] coverage as a :class:`~radguard.provenance.profiles.Coverage`
        (ConfigError if it is not one)."""
        from radguard.provenance.profiles import Coverage

        try:
            return Coverage(self.signatures_coverage)
        except ValueError as exc:
            raise ConfigError(f"signatures.coverage {self.signatures_coverage!r}: one of "
                              + ", ".join(f'"{c.value}"' for c in Coverage)) from exc

    #: what a [forensics] source key may be made of
    SOURCE_PARTS = ("calling_ae", "station", "modality")
    UNCALIBRATED = ("worklist", "quarantine", "global")

    def source_parts(self) -> tuple[str, ...]:
        """[forensics] source as its parts, calling_ae first (ConfigError if malformed)."""
        parts = tuple(p.strip() for p in str(self.forensics_source).split("+"))
        if not parts or parts[0] != "calling_ae" or len(set(parts)) != len(parts) or \
                not set(parts) <= set(self.SOURCE_PARTS):
            raise ConfigError(f"forensics.source {self.forensics_source!r}: \"calling_ae\", "
                              "optionally with +station and/or +modality")
        return parts

    def calibration_policy(self) -> Any:  # noqa: ANN401 (forensics.calibration, lazily)
        """The [forensics] block as a CalibrationPolicy (ConfigError on a bad value)."""
        from radguard.forensics.calibration import CalibrationError, CalibrationPolicy

        number = functools.partial(self._number, table="forensics")
        number("false_alarm_rate", 1e-6, 0.5, whole=False)
        number("provisional_rate", 1e-6, 0.5, whole=False)
        number("sample_vouched", 1, 1_000_000)
        number("window", 1, 100_000)
        self.source_parts()
        if self.forensics_uncalibrated not in self.UNCALIBRATED:
            raise ConfigError(f"forensics.uncalibrated {self.forensics_uncalibrated!r}: one of "
                              + ", ".join(f'"{v}"' for v in self.UNCALIBRATED))
        try:
            return CalibrationPolicy(float(self.forensics_false_alarm_rate),
                                     float(self.forensics_provisional_rate),
                                     int(self.forensics_window))
        except CalibrationError as exc:
            raise ConfigError(f"forensics: {exc}") from exc

    def _validate_http(self) -> None:
        """The HTTP block: body and login limits, trusted proxies."""
        import ipaddress

        number = self._number

        number("stow_max_mb", 1, 1 << 20)
        if number("login_max_failures_all_clients", 1, 100_000) < \
                number("login_max_failures", 1, 1000):
            raise ConfigError("login_max_failures_all_clients must not be below "
                              "login_max_failures")
        number("login_max_failures_per_client", 1, 100_000)
        first = number("login_backoff_seconds", 0.01, 86400, whole=False)
        if number("login_backoff_max_seconds", 0.01, 86400, whole=False) < first:
            raise ConfigError("login_backoff_max_seconds must not be below login_backoff_seconds")
        number("http_max_connections", 8, 100_000)
        number("http_max_per_client", 1, 100_000)
        number("http_header_seconds", 1, 3600, whole=False)
        if not isinstance(self.trusted_proxies, list):
            raise ConfigError("trusted_proxies: a list of addresses or networks")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(str(proxy), strict=False)
            except ValueError as exc:
                raise ConfigError(f"trusted_proxies entry {proxy!r}: not an IP address or "
                                  "network") from exc


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> GatewayConfig:  # noqa: ANN401
    """Defaults, then the TOML file, then explicit overrides (command-line options)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: configuration file not found") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{p}: not a valid TOML configuration ({exc})") from exc
        for table in ("forward", "oidc", "signatures", "dicom", "forensics", "viewer",
                      "results", "cluster", "readers", "notify"):
            section = raw.pop(table, {}) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{p}: [{table}] must be a table")
            raw.update({f"{table}_{k}": v for k, v in section.items()})
        known = {f.name for f in fields(GatewayConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown setting(s) {', '.join(unknown)}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewayConfig(**values).validate()
    except TypeError as exc:
        raise ConfigError(f"invalid configuration ({exc})") from exc
