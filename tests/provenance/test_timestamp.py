"""RFC 3161 certified timestamps against a real TSA (``openssl ts -reply`` behind HTTP)."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from radguard.dicom import read_dataset
from radguard.errors import TimestampError
from radguard.provenance import TrustStore, http_timestamper, sign_dataset, sign_file, verify_file
from radguard.provenance.keys import (
    Identity,
    Signer,
    create_signer,
    generate_private_key,
    save_certificate,
    save_private_key,
)
from radguard.provenance.verify import verify_dataset
from tests.conftest import NIH_DX, run_dcmsign, utc_now

TSA_CONFIG = """
[ tsa ]
default_tsa = tsa1
[ tsa1 ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.cert.pem
certs = $dir/tsa.cert.pem
signer_key = $dir/tsa.key.pem
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def _tsa_certificate(pki):
    key = generate_private_key("rsa2048")
    now = utc_now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TSA")]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(pki.ca_key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def tsa(pki):
    folder = Path(tempfile.mkdtemp(prefix="tsa"))
    key, cert = _tsa_certificate(pki)
    save_private_key(key, folder / "tsa.key.pem")
    save_certificate(cert, folder / "tsa.cert.pem")
    (folder / "serial").write_text("01\n")
    (folder / "tsa.cnf").write_text(TSA_CONFIG.format(dir=folder))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            query = self.rfile.read(int(self.headers["Content-Length"]))
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "q.tsq").write_bytes(query)
                subprocess.run(["openssl", "ts", "-reply", "-config", str(folder / "tsa.cnf"),
                                "-queryfile", f"{tmp}/q.tsq", "-out", f"{tmp}/r.tsr"],
                               check=True, capture_output=True)
                body = (Path(tmp) / "r.tsr").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tsa", cert
    server.shutdown()


def test_timestamped_signature_verifies(pki, tsa, tmp_path):
    url, _ = tsa
    out = tmp_path / "ts.dcm"
    info = sign_file(NIH_DX, out, pki.signer, timestamper=http_timestamper(url))
    assert info.timestamped
    report = verify_file(out, TrustStore([pki.ca_cert]))
    ts = report.signatures[0].timestamp
    assert report.status == "valid" and ts is not None and ts.trusted
    assert abs((ts.time - utc_now()).total_seconds()) < 120 and ts.tsa == "CN=Test TSA"


def test_dcmsign_accepts_the_timestamp(dcmsign, pki, tsa, tmp_path):
    url, _ = tsa
    out = tmp_path / "ts.dcm"
    sign_file(NIH_DX, out, pki.signer, timestamper=http_timestamper(url))
    result = run_dcmsign("--verify", "+cf", pki.ca_cert_path, "+tr", out)
    assert result.returncode == 0, result.stderr


def test_timestamp_keeps_a_signature_valid_after_the_certificate_expires(pki, tsa):
    url, _ = tsa
    key, cert = create_signer(Identity("Short-lived DX"), ca_key=pki.ca_key,
                              ca_cert=pki.ca_cert, days=3)
    later = utc_now() + dt.timedelta(days=10)  # the signer's certificate has expired by then
    stamped = read_dataset(NIH_DX)
    sign_dataset(stamped, Signer(key, cert), timestamper=http_timestamper(url))
    assert verify_dataset(stamped, TrustStore([pki.ca_cert]), now=later).status == "valid"
    plain = read_dataset(NIH_DX)
    sign_dataset(plain, Signer(key, cert))
    report = verify_dataset(plain, TrustStore([pki.ca_cert]), now=later)
    assert report.status == "untrusted" and "expired" in report.signatures[0].reason


def test_forged_or_transplanted_timestamps_are_invalid(pki, tsa):
    url, _ = tsa
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, pki.signer, timestamper=http_timestamper(url))
    item = ds.DigitalSignaturesSequence[0]
    original = bytes(item.CertifiedTimestamp)
    imprint_at = original.find(hashlib.sha256(bytes(item.Signature)).digest())
    assert imprint_at > 0
    for position, reason in ((len(original) - 10, "TSA signature"),  # CMS signature value
                             (imprint_at + 3, "does not stamp")):  # the stamped hash
        token = bytearray(original)
        token[position] ^= 0x01
        item.CertifiedTimestamp = bytes(token)
        report = verify_dataset(ds, TrustStore([pki.ca_cert]))
        assert report.status == "invalid" and reason in report.signatures[0].reason

    other = read_dataset(NIH_DX)
    sign_dataset(other, pki.signer, timestamper=http_timestamper(url))
    victim = read_dataset(NIH_DX)
    sign_dataset(victim, pki.signer)
    victim.DigitalSignaturesSequence[0].CertifiedTimestampType = "CMS_TSP"
    victim.DigitalSignaturesSequence[0].CertifiedTimestamp = (
        other.DigitalSignaturesSequence[0].CertifiedTimestamp)
    report = verify_dataset(victim, TrustStore([pki.ca_cert]))
    assert report.status == "invalid" and "does not stamp this signature" in \
        report.signatures[0].reason


def test_unreachable_tsa_is_a_clear_error_and_writes_nothing(pki, tmp_path):
    out = tmp_path / "never.dcm"
    with pytest.raises(TimestampError, match="unreachable"):
        sign_file(NIH_DX, out, pki.signer, timestamper=http_timestamper("http://127.0.0.1:9/"))
    assert not out.exists()
    with pytest.raises(TimestampError, match="URL"):
        http_timestamper("ftp://tsa.example")
