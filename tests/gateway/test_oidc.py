"""OpenID Connect bearer tokens over real HTTP: the identity provider's key set from a file
and from a URL (with key rotation), every way a token can be wrong, role mapping, audit."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from radguard.gateway import ConfigError, Gateway, GatewayConfig, load_config
from radguard.gateway.auth import AuthError
from radguard.gateway.oidc import OidcSettings, OidcVerifier
from tests.gateway.test_web import ROUTES, _call

ISSUER = "https://sso.hospital.example/realms/radiology"


def _jwk(key, kid: str) -> dict:
    data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
                      if isinstance(key, rsa.RSAPrivateKey)
                      else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig"}


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "other": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


def _token(key, kid="k1", alg="RS256", **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "radguard", "exp": now + 300, "iat": now,
            "sub": "f3a9", "preferred_username": "dr.lee",
            "realm_access": {"roles": ["radiology", "offline_access"]}, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


@pytest.fixture
def gateway(tmp_path, keys):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(keys["rsa"], "k1"), _jwk(keys["ec"], "k2")]}))
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           check_processes=0, oidc_issuer=ISSUER, oidc_audience="radguard",
                           oidc_jwks=str(jwks), oidc_role_claim="realm_access.roles",
                           oidc_roles={"radiology": "radiologist", "pacs-admin": "admin"})
    gw = Gateway(config.validate())
    gw.start()
    yield gw
    gw.stop()


def test_a_provider_token_opens_what_its_role_allows_and_is_audited(gateway, keys):
    token = _token(keys["rsa"])
    status, body, _ = _call(gateway, "GET", "/dicom-web/studies", token)
    assert status == 200, body
    assert _call(gateway, "GET", "/audit", token)[0] == 403  # a radiologist, not an auditor
    admin = _token(keys["ec"], kid="k2", alg="ES256",
                   realm_access={"roles": ["pacs-admin", "radiology"]})
    assert _call(gateway, "GET", "/audit", admin)[0] == 200  # the most capable role wins
    access = [e for e in gateway.audit_log.entries() if e.action == "http.access"]
    assert access[0].actor == "dr.lee" and access[0].details == {"via": "oidc"}


@pytest.mark.parametrize("change, why", [
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"iss": "https://evil.example/"}, "issuer"),
    ({"aud": "another-app"}, "audience"),
    ({"exp": None}, "exp"),
])
def test_wrong_claims_are_refused(gateway, keys, change, why):
    status, body, headers = _call(gateway, "GET", "/dicom-web/studies",
                                  _token(keys["rsa"], **change))
    assert status == 401 and "Bearer" in headers.get("www-authenticate", "")
    assert why in json.loads(body)["error"].lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(header: dict, payload: str, secret: bytes) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{payload}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def test_forged_tokens_are_refused(gateway, keys):
    public_pem = keys["rsa"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header, _payload, signature = _token(keys["rsa"]).split(".")
    promoted = _b64(json.dumps(
        {"iss": ISSUER, "aud": "radguard", "exp": int(time.time()) + 60,
         "preferred_username": "dr.lee", "realm_access": {"roles": ["pacs-admin"]}}).encode())
    forged = [
        _token(keys["other"]),  # right kid, someone else's key
        _token(keys["other"], kid="k9"),  # a key the provider never published
        # the algorithm-confusion attack: HMAC keyed with the provider's public key (built
        # by hand: PyJWT itself refuses to make one)
        _hs256({"alg": "HS256", "kid": "k1", "typ": "JWT"}, promoted, public_pem),
        # alg none, and a good token with its payload swapped
        jwt.encode({"iss": ISSUER, "aud": "radguard", "exp": int(time.time()) + 60},
                   None, algorithm="none"),
        f"{header}.{promoted}.{signature}",
        # an algorithm that does not fit the named key (PyJWT would raise a TypeError)
        _token(keys["ec"], kid="k1", alg="ES256"),
        _token(keys["rsa"], kid="k2", alg="RS256"),
        "a.b.c", "..",
    ]
    # headers of every hostile shape, with a real signature behind them
    for bad in ({"alg": "RS256", "kid": ["k1"]}, {"alg": "RS256", "kid": {"a": 1}},
                {"alg": ["RS256"], "kid": "k1"}, {"alg": None}, {"kid": "k1"}, [], "RS256", 7,
                None, {"alg": "RS256", "kid": "k1", "crit": ["exp"]}):
        forged.append(f"{_b64(json.dumps(bad).encode())}.{promoted}.{signature}")
    for token in forged:
        assert _call(gateway, "GET", "/dicom-web/studies", token)[0] == 401, token
    assert not [e for e in gateway.audit_log.entries() if e.action == "http.access"]


def test_a_token_without_a_radguard_role_may_do_nothing(gateway, keys):
    token = _token(keys["rsa"], realm_access={"roles": ["offline_access"]})
    for method, path in ROUTES:
        status, _, _ = _call(gateway, method, path, token,
                             body=b"" if method == "POST" else None)
        assert status == 403, (method, path, status)
    assert any(e.action == "auth.no_role" for e in gateway.audit_log.entries())


def test_radguard_tokens_still_work_beside_oidc(gateway):
    from radguard.gateway.auth import Users

    users = Users(gateway.store)
    users.add("rad", "radiologist", "correct horse battery")
    assert _call(gateway, "GET", "/dicom-web/studies", users.issue_token("rad"))[0] == 200


class _Jwks(http.server.BaseHTTPRequestHandler):
    keys: dict = {}
    fetches = 0

    def do_GET(self):  # noqa: N802
        type(self).fetches += 1
        body = json.dumps(self.keys).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # noqa: ANN002
        pass


def test_keys_from_the_provider_url_and_key_rotation(keys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Jwks.keys = {"keys": [_jwk(keys["rsa"], "k1")]}
        url = f"http://127.0.0.1:{server.server_port}/certs"
        settings = OidcSettings(ISSUER, "radguard", url, "realm_access.roles",
                                roles={"radiology": "radiologist"})
        verifier = OidcVerifier(settings, refetch_after=0)
        assert verifier.user(_token(keys["rsa"])).role == "radiologist"
        assert verifier.user(_token(keys["rsa"])).name == "dr.lee"
        assert _Jwks.fetches == 1  # cached
        _Jwks.keys = {"keys": [_jwk(keys["rsa"], "k1"), _jwk(keys["ec"], "k2")]}  # rotation
        assert verifier.user(_token(keys["ec"], kid="k2", alg="ES256")).role == "radiologist"
        assert _Jwks.fetches == 2
        with pytest.raises(AuthError, match="lacks"):
            verifier.user(_token(keys["other"], kid="k3"))
        # by default made-up key ids do not make the gateway refetch again and again
        _Jwks.fetches = 0
        guarded = OidcVerifier(settings)
        assert guarded.user(_token(keys["rsa"])).name == "dr.lee"
        for kid in ("x1", "x2", "x3"):
            with pytest.raises(AuthError, match="lacks"):
                guarded.user(_token(keys["other"], kid=kid))
        assert _Jwks.fetches == 1
    finally:
        server.shutdown()
    dead = OidcVerifier(OidcSettings(ISSUER, "radguard", url, "realm_access.roles"))
    with pytest.raises(AuthError, match="cannot be fetched"):
        dead.user(_token(keys["rsa"]))


def test_oidc_configuration_errors_are_clear(tmp_path):
    (tmp_path / "g.toml").write_text(f'[oidc]\nissuer = "{ISSUER}"\naudience = "radguard"\n'
                                     'jwks = "http://sso.hospital.example/certs"\n')
    with pytest.raises(ConfigError, match="https"):
        load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text(f'[oidc]\nissuer = "{ISSUER}"\n')
    with pytest.raises(ConfigError, match="issuer, audience and jwks"):
        load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text(f'[oidc]\nissuer = "{ISSUER}"\naudience = "radguard"\n'
                                     f'jwks = "{tmp_path / "none.json"}"\n')
    with pytest.raises(ConfigError, match="not an http"):
        load_config(tmp_path / "g.toml")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "g.toml").write_text(f'[oidc]\nissuer = "{ISSUER}"\naudience = "radguard"\n'
                                     f'jwks = "{tmp_path / "bad.json"}"\n'
                                     'roles = { "x" = "superuser" }\n')
    with pytest.raises(ConfigError, match="unknown role"):
        load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text(f'[oidc]\nissuer = "{ISSUER}"\naudience = "radguard"\n'
                                     f'jwks = "{tmp_path / "bad.json"}"\n')
    config = load_config(tmp_path / "g.toml", data_dir=str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="not a readable JWKS"):
        Gateway(config)
