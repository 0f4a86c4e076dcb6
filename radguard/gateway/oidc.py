"""OpenID Connect bearer tokens: access tokens (JWTs) from the hospital's identity provider.

Hospitals run one identity provider (Keycloak, Entra ID, ADFS...) for all their systems, so
scripts and viewers should reach the gateway with the provider's tokens rather than with
passwords kept in radguard. A token is accepted only when

* its signature verifies with a key of the provider's published key set (JWKS, fetched from
  ``jwks`` and cached, refetched when a token names a key it has not seen: key rotation) -
  asymmetric algorithms only, so no "none" and no HMAC with a public key as its secret;
* ``iss`` is the configured issuer and ``aud`` contains the configured audience;
* ``exp`` has not passed (and ``nbf``/``iat`` are not in the future), with 60 s of leeway
  for clocks.

The user name is the ``username_claim`` (``preferred_username``, else ``sub``); the role
comes from ``role_claim`` (a list or a string, a dotted path such as
``realm_access.roles`` for Keycloak), each value mapped through ``roles`` (radguard's own role
names map to themselves). A token without a radguard role is authenticated but may do nothing
(403). With several roles the most capable wins: admin, radiologist, auditor, technologist.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radguard.gateway.auth import ROLES, AuthError, User

__all__ = ["ALGORITHMS", "NoRole", "OidcSettings", "OidcVerifier"]

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")
LEEWAY_SECONDS = 60
_PRECEDENCE = ("admin", "radiologist", "auditor", "technologist")


class NoRole(AuthError):
    """A valid token whose claims carry no radguard role."""


@dataclass(frozen=True)
class OidcSettings:
    """Where tokens come from and how their claims become a radguard user."""

    issuer: str
    audience: str
    jwks: str  # the provider's key set: an https URL (http only on this machine) or a file
    role_claim: str = "roles"
    username_claim: str = "preferred_username"
    roles: dict[str, str] = field(default_factory=dict)  # provider value -> radguard role

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when usable)."""
        out = []
        if not self.issuer or not self.audience or not self.jwks:
            out.append("oidc needs issuer, audience and jwks")
        if self.jwks.startswith("http://") and not _loopback(self.jwks):
            out.append("oidc.jwks over plain http only from this machine; use https")
        elif not self.jwks.startswith(("https://", "http://")) and self.jwks \
                and not Path(self.jwks).is_file():
            out.append(f"oidc.jwks {self.jwks}: not an http(s) URL or an existing file")
        bad = sorted(v for v in self.roles.values() if v not in ROLES)
        if bad:
            out.append(f"oidc.roles maps to unknown role(s) {', '.join(bad)} (roles: "
                       f"{', '.join(ROLES)})")
        return out


def _loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class OidcVerifier:
    """Validates bearer JWTs against one provider (thread-safe; keys cached)."""

    def __init__(self, settings: OidcSettings, *, refetch_after: float = 30.0) -> None:
        """``refetch_after``: seconds between key-set fetches forced by tokens naming an
        unknown key (rotation), so a flood of made-up key ids cannot hammer the provider."""
        import jwt

        problems = settings.problems()
        if problems:
            raise AuthError("; ".join(problems))
        self.settings = settings
        self._jwt = jwt
        self._lock = threading.Lock()
        self._client = None
        self._file_keys: dict[str, Any] = {}
        if settings.jwks.startswith(("https://", "http://")):
            self._client = jwt.PyJWKClient(settings.jwks, cache_keys=True, lifespan=3600,
                                           timeout=10, cooldown_duration=refetch_after)
        else:
            self._file_keys = _read_key_file(Path(settings.jwks))

    def _key(self, token: str, header: dict) -> Any:  # noqa: ANN401
        jwt = self._jwt
        if header.get("alg") not in ALGORITHMS:
            raise AuthError(f"token algorithm {header.get('alg')!r} not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed bearer token (key id)")
        if self._client is None:
            if kid is None and len(self._file_keys) == 1:
                return next(iter(self._file_keys.values()))
            if kid not in self._file_keys:
                raise AuthError("token signed with a key the provider's key set lacks")
            return self._file_keys[kid]
        try:
            with self._lock:  # one refetch at a time when a new key appears
                return self._client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthError(f"the identity provider's keys cannot be fetched ({exc})") from exc
        except jwt.PyJWKClientError as exc:
            raise AuthError("token signed with a key the provider's key set lacks") from exc

    def user(self, token: str) -> User:
        """The user a valid token speaks for; AuthError (or NoRole) otherwise."""
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError("malformed bearer token") from exc
        key = self._key(token, header)
        fits = _algorithms_for(key)
        alg = header.get("alg")
        if alg not in fits:  # e.g. ES256 named on an RSA key: PyJWT would raise a TypeError
            raise AuthError(f"token algorithm {alg!r} does not fit the provider's key")
        s = self.settings
        try:
            claims = jwt.decode(token, key, algorithms=list(fits), audience=s.audience,
                                issuer=s.issuer, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"token not accepted ({exc})") from exc
        name = claims.get(s.username_claim) or claims.get("sub")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise AuthError(f"token names no user ({s.username_claim} or sub)")
        granted = {s.roles.get(v, v if v in ROLES else None) for v in _claim(claims,
                                                                            s.role_claim)}
        role = next((r for r in _PRECEDENCE if r in granted), None)
        if role is None:
            raise NoRole(f"{name}: the token's {s.role_claim} hold no radguard role")
        return User(name, role, via="oidc")


def _algorithms_for(key: Any) -> tuple[str, ...]:  # noqa: ANN401
    """The signature algorithms a public key can verify (its type decides, not the token)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        return (by_curve[key.curve.name],) if key.curve.name in by_curve else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def _claim(claims: dict, path: str) -> list[str]:
    """A (dotted) claim as a list of strings; missing or other types: empty."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return value.split()  # OAuth scope-style: space-separated
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _read_key_file(path: Path) -> dict[str, Any]:
    """kid -> public key from a JWKS file (a provider's published key set, saved)."""
    import jwt

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = jwt.PyJWKSet.from_dict(data).keys
    except (OSError, UnicodeDecodeError, ValueError, jwt.PyJWKSetError) as exc:
        raise AuthError(f"{path}: not a readable JWKS key set ({exc})") from exc
    return {k.key_id or "": k.key for k in keys}
