"""Path validation: anchors, pinned signers, dates, CA flags, foreign issuers."""

from __future__ import annotations

import datetime as dt

from radguard.provenance.keys import Identity, create_ca, create_signer
from radguard.provenance.trust import TrustStore
from tests.conftest import utc_now


def test_chain_to_anchor_and_pinned_signer(pki):
    now = utc_now()
    assert TrustStore([pki.ca_cert]).validate(pki.signer.certificate, now).trusted
    pinned = TrustStore([pki.signer.certificate])
    assert pinned.validate(pki.signer.certificate, now).trusted


def test_foreign_ca_is_untrusted(pki):
    _, other = create_ca("Other CA", algorithm="rsa2048")
    result = TrustStore([other]).validate(pki.signer.certificate, utc_now())
    assert not result.trusted and "not in the trust store" in result.reason


def test_same_name_different_key_is_untrusted(pki):
    """An attacker's CA that copies the real CA's name must not validate."""
    _, impostor = create_ca("Test Radiology CA", organization="Test Hospital",
                            algorithm="rsa2048")
    assert not TrustStore([impostor]).validate(pki.signer.certificate, utc_now()).trusted


def test_dates_are_checked(pki):
    start = utc_now() - dt.timedelta(days=10)
    _, cert = create_signer(Identity("Old DX"), not_before=start,
                            not_after=start + dt.timedelta(days=2))
    store = TrustStore([cert])  # pinned, so only the signer's own dates matter
    assert store.validate(cert, start + dt.timedelta(days=1)).trusted
    late = store.validate(cert, utc_now())
    assert not late.trusted and "expired" in late.reason
    early = store.validate(cert, start - dt.timedelta(days=1))
    assert not early.trusted and "not valid before" in early.reason


def test_self_signed_signer_needs_pinning(pki):
    _, cert = create_signer(Identity("Rogue modality"))
    assert not TrustStore([pki.ca_cert]).validate(cert, utc_now()).trusted
