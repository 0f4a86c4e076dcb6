"""Provenance: keys and certificates, PS3.15 digital signatures, trust, timestamps.

The API mirrors the CLI so the gateway calls it without a subprocess::

    signer = load_signer("dx3.key.pem", "dx3.cert.pem")
    sign_dataset(ds, signer, profile="creator", mac="sha256")
    report = verify_dataset(ds, TrustStore.from_paths(["ca.cert.pem"]),
                            policy=AlgorithmPolicy(min_rsa_bits=3072))
"""

from radguard.provenance.keys import (
    Identity,
    Signer,
    create_ca,
    create_signer,
    load_certificates,
    load_private_key,
    load_signer,
    save_certificate,
    save_private_key,
)
from radguard.provenance.policy import AlgorithmPolicy, AlgorithmVerdict
from radguard.provenance.profiles import PROFILES, SIGNING_MACS
from radguard.provenance.sign import PURPOSES, SignatureInfo, sign_dataset, sign_file, sign_paths
from radguard.provenance.timestamp import http_timestamper, verify_timestamp_token
from radguard.provenance.trust import ChainResult, TrustStore
from radguard.provenance.verify import (
    SignatureCheck,
    VerificationReport,
    verify_dataset,
    verify_file,
)

__all__ = [
    "PROFILES",
    "PURPOSES",
    "SIGNING_MACS",
    "AlgorithmPolicy",
    "AlgorithmVerdict",
    "ChainResult",
    "Identity",
    "SignatureCheck",
    "SignatureInfo",
    "Signer",
    "TrustStore",
    "VerificationReport",
    "create_ca",
    "create_signer",
    "http_timestamper",
    "load_certificates",
    "load_private_key",
    "load_signer",
    "save_certificate",
    "save_private_key",
    "sign_dataset",
    "sign_file",
    "sign_paths",
    "verify_dataset",
    "verify_file",
    "verify_timestamp_token",
]
