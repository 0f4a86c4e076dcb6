"""Which signature algorithms count: the MAC (hash) algorithm and the signer's key size.

PS3.15 still lists MD5 and SHA-1, dcmtk still offers them, and old modalities hold RSA-1024
keys. A signature is only as strong as its weakest part: MD5 and SHA-1 have practical
collisions (whoever gets one of two colliding data sets signed holds a valid signature on
the other), and RSA below 2048 bits or elliptic curves below 256 bits are within reach of a
well-funded attacker (NIST SP 800-57 / SP 800-131A). Such a signature is ``weak``: the data
matches what was signed, but the match proves little, so by default it is not ``valid``.

SHA-256/384/512 and RIPEMD-160 (dcmtk's default; no collision or preimage attack is known)
are accepted. A site with a legacy modality that cannot be upgraded may accept weak
signatures explicitly (``allow_weak``); they then count as valid but stay labelled
``weak-allowed`` in every report, and the reason names what is weak.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from radguard.errors import RadguardError

__all__ = [
    "ACCEPTED_MACS",
    "DEFAULT_POLICY",
    "WEAK_MACS",
    "AlgorithmPolicy",
    "AlgorithmPolicyError",
    "AlgorithmVerdict",
]

#: MAC algorithms (DICOM defined terms) that are strong enough to vouch for data.
ACCEPTED_MACS = frozenset({"RIPEMD160", "SHA256", "SHA384", "SHA512"})
#: MAC algorithms PS3.15 defines but that have practical collision attacks.
WEAK_MACS = frozenset({"MD5", "SHA1"})

#: Bounds a policy may set: lower limits below these would accept keys that are broken
#: outright (RSA-512 was factored in 1999), higher ones are beyond any real key.
RSA_BITS_RANGE = (1024, 16384)
EC_BITS_RANGE = (160, 521)


class AlgorithmPolicyError(RadguardError):
    """An algorithm policy setting is out of range."""


class AlgorithmVerdict(StrEnum):
    """What the policy says about one signature's algorithms."""

    ACCEPTED = "accepted"  # strong hash and key
    WEAK = "weak"  # a weak hash or a short key: the signature is not valid
    WEAK_ALLOWED = "weak-allowed"  # weak, but the policy accepts weak signatures


@dataclass(frozen=True)
class AlgorithmPolicy:
    """The minimum strength a signature needs to be ``valid``.

    ``min_rsa_bits`` / ``min_ec_bits``: shorter keys are weak. ``allow_weak``: weak
    signatures count as valid (still reported as ``weak-allowed``).
    """

    allow_weak: bool = False
    min_rsa_bits: int = 2048
    min_ec_bits: int = 256

    def __post_init__(self) -> None:
        for name, value, (low, high) in (("min_rsa_bits", self.min_rsa_bits, RSA_BITS_RANGE),
                                         ("min_ec_bits", self.min_ec_bits, EC_BITS_RANGE)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise AlgorithmPolicyError(f"{name} {value!r}: a number of bits {low}-{high}")
        if not isinstance(self.allow_weak, bool):
            raise AlgorithmPolicyError(f"allow_weak {self.allow_weak!r}: true or false")

    def weaknesses(self, mac_algorithm: str, key_type: str, key_bits: int) -> list[str]:
        """Why a signature with this MAC and key is weak (empty: it is not)."""
        found = []
        mac = mac_algorithm.strip().upper()
        if mac in WEAK_MACS:
            found.append(f"{mac} MAC (collisions are practical)")
        elif mac not in ACCEPTED_MACS:
            found.append(f"unknown MAC algorithm {mac!r}")
        if key_type == "RSA" and key_bits < self.min_rsa_bits:
            found.append(f"RSA key of {key_bits} bits (at least {self.min_rsa_bits} needed)")
        elif key_type == "ECDSA" and key_bits < self.min_ec_bits:
            found.append(f"EC key of {key_bits} bits (at least {self.min_ec_bits} needed)")
        elif key_type not in ("RSA", "ECDSA"):
            found.append(f"unknown key type {key_type!r}")
        return found

    def judge(self, mac_algorithm: str, key_type: str, key_bits: int
              ) -> tuple[AlgorithmVerdict, list[str]]:
        """The verdict on a signature's algorithms and the weaknesses behind it."""
        found = self.weaknesses(mac_algorithm, key_type, key_bits)
        if not found:
            return AlgorithmVerdict.ACCEPTED, []
        return (AlgorithmVerdict.WEAK_ALLOWED if self.allow_weak else AlgorithmVerdict.WEAK,
                found)


#: The safe default: SHA-2 and RIPEMD-160 MACs, RSA >= 2048 and EC >= 256 bits.
DEFAULT_POLICY = AlgorithmPolicy()
