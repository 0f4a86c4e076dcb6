"""Keys and certificates: identities in subjects, 0600 keys, passphrases, clear errors."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from radguard.errors import KeyMaterialError
from radguard.provenance.keys import (
    Identity,
    create_ca,
    create_signer,
    describe_subject,
    generate_private_key,
    load_certificates,
    load_private_key,
    load_signer,
    save_certificate,
    save_private_key,
)
from radguard.provenance.trust import TrustStore
from tests.conftest import utc_now


def test_device_certificate_carries_device_identity(pki):
    cert = pki.signer.certificate
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DX Room 3"
    assert subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-3"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == \
        "Acquisition Device"
    assert cert.issuer == pki.ca_cert.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert describe_subject(cert).startswith("CN=DX Room 3, O=Test Hospital")


def test_technologist_certificate_names_the_person(pki):
    _, cert = create_signer(Identity("Jane Doe", "technologist", "Test Hospital", "T-042"),
                            ca_key=pki.ca_key, ca_cert=pki.ca_cert)
    assert "OU=Technologist" in describe_subject(cert)
    assert "serialNumber=T-042" in describe_subject(cert)
    assert TrustStore([pki.ca_cert]).validate(cert, utc_now()).trusted


def test_private_keys_are_0600(pki):
    mode = stat.S_IMODE(pki.key_path.stat().st_mode)
    assert mode == 0o600


def test_passphrase_round_trip_and_errors(tmp_path):
    key = generate_private_key("rsa2048")
    path = tmp_path / "k.pem"
    save_private_key(key, path, b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    loaded = load_private_key(path, b"correct horse")
    assert isinstance(loaded, rsa.RSAPrivateKey)
    with pytest.raises(KeyMaterialError, match="wrong passphrase"):
        load_private_key(path, b"battery staple")
    with pytest.raises(KeyMaterialError, match="passphrase-protected"):
        load_private_key(path)


def test_certificate_must_match_key(tmp_path, pki):
    other = generate_private_key("rsa2048")
    save_private_key(other, tmp_path / "other.key.pem")
    with pytest.raises(KeyMaterialError, match="does not match"):
        load_signer(tmp_path / "other.key.pem", pki.cert_path)


def test_chain_in_certificate_file_is_loaded(pki):
    signer = load_signer(pki.key_path, pki.cert_path)
    assert signer.chain and signer.chain[0].subject == pki.ca_cert.subject


def test_issuer_must_be_a_ca(pki):
    with pytest.raises(KeyMaterialError, match="not a CA"):
        create_signer(Identity("X"), ca_key=pki.signer.key, ca_cert=pki.signer.certificate)


def test_ecdsa_option_and_small_rsa_refused(tmp_path):
    key = generate_private_key("ecdsa-p256")
    save_private_key(key, tmp_path / "ec.pem")
    assert load_private_key(tmp_path / "ec.pem").curve.name == "secp256r1"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    save_private_key(small, tmp_path / "small.pem")
    with pytest.raises(KeyMaterialError, match="at least 2048"):
        load_private_key(tmp_path / "small.pem")
    with pytest.raises(KeyMaterialError, match="unknown key algorithm"):
        generate_private_key("dsa1024")


@pytest.mark.parametrize("content", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nxx\n"])
def test_garbage_key_and_cert_files(tmp_path, content):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(KeyMaterialError):
        load_private_key(bad)
    with pytest.raises(KeyMaterialError):
        load_certificates(bad)
    with pytest.raises(KeyMaterialError, match="not found"):
        load_certificates(tmp_path / "missing.pem")


def test_ca_and_certificate_files(tmp_path):
    key, cert = create_ca("Mini CA", algorithm="rsa2048", days=30)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    save_certificate(cert, tmp_path / "ca.pem")
    assert load_certificates(tmp_path / "ca.pem")[0] == cert
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30


def test_every_wrong_passphrase_is_reported_as_such(tmp_path):
    """About one wrong passphrase in 256 decrypts to garbage instead of failing the padding
    check; that too must read as a wrong passphrase, not as a damaged key."""
    from radguard.provenance.keys import generate_private_key

    save_private_key(generate_private_key(), tmp_path / "k.pem", b"the right one")
    for i in range(400):
        with pytest.raises(KeyMaterialError, match="wrong passphrase"):
            load_private_key(tmp_path / "k.pem", f"guess {i}".encode())
