"""Users, roles and bearer tokens for the gateway's HTTP side.

Passwords are stored as scrypt hashes (n=2^14, r=8, p=1, 16-byte salt); tokens are 32 random
bytes shown once and stored only as their SHA-256, so a stolen database yields no usable
credential. Resetting a password revokes the user's tokens; ``radguard user revoke`` and
``radguard user remove`` revoke them on demand. The hospital's identity provider can issue
the tokens instead (OpenID Connect access tokens, :mod:`radguard.gateway.oidc`). Roles and
what they may do:

============== ==================================================================
technologist   send images (STOW-RS)
radiologist    worklist, study views, QIDO/WADO reads
admin          everything, including quarantine release/reject and users
auditor        the audit log (read only)
============== ==================================================================
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from radguard.errors import RadguardError
from radguard.gateway.store import Store

__all__ = ["ROLES", "AuthError", "User", "Users", "may_see_quarantine"]

ROLES = ("technologist", "radiologist", "admin", "auditor")
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "dklen": 32}
TOKEN_DAYS = 30


class AuthError(RadguardError):
    """Unknown user, wrong password, bad token or bad role."""


@dataclass(frozen=True)
class User:
    """An authenticated user."""

    name: str
    role: str
    via: str = "radguard"  # radguard's own token or login, or "oidc" (the provider's token)


def may_see_quarantine(user: User) -> bool:
    """Whether ``user``'s DICOMweb and DIMSE answers include quarantined instances: only
    the role that decides about them (admin); everyone else sees clinical data only."""
    return user.role == "admin"


def _hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """User and token tables inside the gateway's store database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, role: str, password: str) -> int:
        """Create or replace a user. Replacing one (a password reset) also revokes all its
        tokens and so ends its web sessions: whoever knew the old password may have one.
        Returns the number of tokens revoked."""
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not name or len(name) > 64 or not name.isprintable():
            raise AuthError("a user name is 1-64 printable characters")
        if len(password) < 10:
            raise AuthError("a password needs at least 10 characters")
        salt = secrets.token_bytes(16)
        digest = _hash_password(password, salt)  # before the write lock: scrypt takes a while
        with self.store.transaction():
            self.store.execute("DELETE FROM users WHERE name=?", (name,))
            revoked = self.store.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount
            self.store.execute(
                "INSERT INTO users (name, role, salt, password_hash, created) "
                "VALUES (?,?,?,?,?)",
                (name, role, salt, digest, dt.datetime.now(dt.UTC).isoformat()))
        return int(revoked)

    def check_password(self, name: str, password: str) -> User:
        """The user, if the password is right (constant-time compare)."""
        row = self.store.execute("SELECT role, salt, password_hash FROM users WHERE name=?",
                                 (name,)).fetchone()
        if row is None:
            _hash_password(password, b"0" * 16)  # same work either way: no user oracle
            raise AuthError("wrong user name or password")
        role, salt, stored = row
        if not hmac.compare_digest(_hash_password(password, bytes(salt)), bytes(stored)):
            raise AuthError("wrong user name or password")
        return User(name, role)

    def issue_token(self, name: str, days: int = TOKEN_DAYS) -> str:
        """A new bearer token for an existing user (shown once)."""
        self._must_exist(name)
        token = secrets.token_urlsafe(32)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
        with self.store.transaction():
            self.store.execute("INSERT INTO tokens (digest, name, expires) VALUES (?,?,?)",
                               (_token_digest(token), name, expires.isoformat()))
        return token

    def user_for_token(self, token: str) -> User:
        """The token's user, if the token exists and has not expired."""
        row = self.store.execute(
            "SELECT u.name, u.role, t.expires FROM tokens t JOIN users u ON u.name = t.name "
            "WHERE t.digest=?", (_token_digest(token),)).fetchone()
        if row is None:
            raise AuthError("unknown token")
        if dt.datetime.fromisoformat(row[2]) < dt.datetime.now(dt.UTC):
            raise AuthError("token expired")
        return User(row[0], row[1])

    def revoke(self, token: str) -> None:
        """Forget a token (logout)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM tokens WHERE digest=?", (_token_digest(token),))

    def revoke_all(self, name: str) -> int:
        """Forget every token of a user (a lost laptop, a leaked script token); returns how
        many there were. Their web sessions end with their next request."""
        self._must_exist(name)
        with self.store.transaction():
            return int(self.store.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount)

    def remove(self, name: str) -> int:
        """Delete a user and all its tokens; returns the number of tokens revoked."""
        self._must_exist(name)
        with self.store.transaction():
            revoked = self.store.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount
            self.store.execute("DELETE FROM users WHERE name=?", (name,))
        return int(revoked)

    def _must_exist(self, name: str) -> None:
        if self.store.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone() is None:
            raise AuthError(f"no user {name!r}")
