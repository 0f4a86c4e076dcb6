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
    trust_signed_pixels = true        # a trusted signature over the pixel data makes the
                                      # content detectors (synthetic image, copy-move, fill /
                                      # splice) unnecessary
    check_processes = "auto"          # run the checks (signature, forensics, triage) in this
                                      # many separate processes, so they do not share one
                                      # interpreter lock with receiving; "auto": one per core
                                      # (at most 4), none on a single core; 0: in-process

    [forward]                         # the PACS; leave out to keep images here only
    dimse = "ORTHANC@127.0.0.1:4242"  # C-STORE target, AE@host:port
    stow = ""                         # or a DICOMweb root, e.g. http://user:pw@pacs/dicom-web/

    [oidc]                            # also accept the identity provider's access tokens
    issuer = "https://sso.hospital.example/realms/radiology"   # 'iss' must be exactly this
    audience = "radguard"             # 'aud' must contain this
    jwks = "https://sso.hospital.example/realms/radiology/protocol/openid-connect/certs"
                                      # the provider's keys: https URL or a saved JWKS file
    role_claim = "realm_access.roles" # claim holding the user's roles (dotted path)
    username_claim = "preferred_username"
    roles = { "pacs-admin" = "admin", "radiology" = "radiologist" }  # provider -> radguard
                                      # role; radguard's own role names map to themselves
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError

__all__ = ["ConfigError", "DimseTarget", "GatewayConfig", "load_config"]


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
    trust_signed_pixels: bool = True  # skip content detectors when a trusted signature
                                      # covers the pixel data (header checks still run)
    tls_cert: str = ""
    tls_key: str = ""
    check_processes: int | str = "auto"  # see check_process_count; 0: checks run on the
                                         # worker threads of the gateway process
    oidc_issuer: str = ""  # [oidc]: accept the identity provider's access tokens too
    oidc_audience: str = ""
    oidc_jwks: str = ""
    oidc_role_claim: str = "roles"
    oidc_username_claim: str = "preferred_username"
    oidc_roles: dict[str, str] = field(default_factory=dict)

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
        if self.db_url and not self.db_url.startswith(("postgresql://", "postgres://")):
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
        return self


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
        for table in ("forward", "oidc"):
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
