"""The gateway's per-source calibration (issue 22 items 3-5): known-real instances feed their
source's calibration, an unsigned image from a source not calibrated is unverifiable and goes
to the worklist with its badge (or to quarantine, if configured), one from a calibrated source
is judged against it, radguard-watermarked images are scanned on their restored original, a
readable MR is not quarantined for want of a detector, and the check processes' results are
judged in the gateway process."""

from __future__ import annotations

import pytest

from radguard.forensics.scan import NO_CALIBRATION
from radguard.gateway import GatewayConfig
from radguard.gateway.dimse import header_of
from radguard.gateway.pipeline import CheckPool, Pipeline
from radguard.gateway.store import Store
from tests.conftest import MR_NATIVE, RG2_JPLY, SHARED
from tests.forensics.test_calibration import NIH, dx_from

# 9 known-real scores per detector calibrate a source to 1 in 5 (per detector 1 in 10), 4 to
# the provisional 1 in 2.5: small enough for a test, the same arithmetic as 1 in 1,000
SMALL = {"forensics_false_alarm_rate": 0.2, "forensics_provisional_rate": 0.4}


@pytest.fixture
def gateway_parts(tmp_path, pki):
    def make(**settings):
        config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                               trust=[str(pki.ca_cert_path)],
                               **{"check_processes": 0, **SMALL, **settings}).validate()
        store = Store(config.data_dir)
        return config, store, Pipeline(config, store)
    return make


def _route(store: Store, pipeline: Pipeline, path, ae: str):
    data = path.read_bytes()
    store.ingest(data, header_of(data, decode_compressed=False), source="dimse",
                 calling_ae=ae)
    instance = store.claim()
    return instance, pipeline.route(instance)


def _signed(pki, tmp_path, raster, name):
    from radguard.provenance.sign import sign_file

    sign_file(dx_from(raster, tmp_path, f"{name}.plain.dcm"), tmp_path / name, pki.signer)
    return tmp_path / name


def test_known_real_instances_calibrate_their_source(gateway_parts, pki, tmp_path):
    config, store, pipeline = gateway_parts()
    unsigned = dx_from(NIH[30], tmp_path, "unsigned.dcm")
    _, first = _route(store, pipeline, unsigned, "DX_A")
    assert (first.state, first.verdict, first.trust) == ("done", "unverifiable", "unsigned")
    assert first.reasons[-1].startswith(NO_CALIBRATION)
    assert first.details["scan"]["synthetic_score"] is not None  # scores kept either way
    assert first.details["calibration"]["status"] == "not calibrated"
    for i in range(9):
        _, signed = _route(store, pipeline, _signed(pki, tmp_path, NIH[i], f"s{i}.dcm"),
                           "DX_A")
        assert (signed.state, signed.verdict, signed.trust) == ("done", "authentic", "signed")
        assert signed.details["calibration"]["as"] == "signature"
        assert signed.details["calibration"]["recorded"] is True
        if i == 4:  # 5 known-real images: judged provisionally (suspicious at most)
            _, again = _route(store, pipeline, dx_from(NIH[30], tmp_path, "u4.dcm"), "DX_A")
            assert again.details["calibration"]["status"] == "provisional"
            assert again.verdict in ("authentic", "suspicious")
    assert pipeline.calibration.counts()["DX_A/DX"] == {"synthetic": 9, "local_edit": 9}
    # another copy (other bytes) of the unsigned image, now judged against its source
    data = unsigned.read_bytes()
    second = dx_from(NIH[30], tmp_path, "unsigned2.dcm")
    assert second.read_bytes() != data
    _, judged = _route(store, pipeline, second, "DX_A")
    assert judged.details["calibration"]["status"] == "calibrated"
    assert judged.verdict != "unverifiable"
    assert any("DX_A/DX's calibration" in x or "this source's limit" in x
               for x in judged.reasons), judged.reasons
    assert not any(r.startswith(NO_CALIBRATION) for r in judged.reasons)
    # another room is a source of its own: not calibrated by DX_A's images
    _, elsewhere = _route(store, pipeline, dx_from(NIH[31], tmp_path, "b.dcm"), "DX_B")
    assert elsewhere.verdict == "unverifiable" and elsewhere.state == "done"
    # calibrated: a signed image no longer needs the detectors (unless sampled)
    assert "DX_A/DX" in pipeline.calibration.calibrated_sources()
    instance, later = _route(store, pipeline, _signed(pki, tmp_path, NIH[12], "late.dcm"),
                             "DX_A")
    sampled = int(instance.sha256[:8], 16) % config.forensics_sample_vouched == 0
    assert (later.details["scan"]["synthetic_score"] is not None) == sampled
    assert later.verdict == "authentic"


def test_uncalibrated_policy_quarantine_and_global(gateway_parts, tmp_path):
    _, store, pipeline = gateway_parts(forensics_uncalibrated="quarantine")
    _, held = _route(store, pipeline, dx_from(NIH[32], tmp_path, "u.dcm"), "DX_C")
    assert held.state == "quarantined" and held.verdict == "unverifiable"
    assert held.reasons[0].startswith(NO_CALIBRATION)


def test_global_policy_judges_uncalibrated_sources_at_the_shipped_point(gateway_parts,
                                                                        tmp_path):
    _, store, pipeline = gateway_parts(forensics_uncalibrated="global")
    _, routed = _route(store, pipeline, dx_from(NIH[33], tmp_path, "u.dcm"), "DX_D")
    assert routed.verdict != "unverifiable"
    assert routed.details["calibration"]["status"] == "global"


def test_watermarked_real_image_is_authentic_and_feeds_calibration(gateway_parts, tmp_path):
    from radguard.dicom import read_dataset, write_dataset
    from radguard.watermark import embed_dataset, generate_key_file, load_key

    generate_key_file(tmp_path / "wm.key")
    _, store, pipeline = gateway_parts(watermark_key=str(tmp_path / "wm.key"))
    marked = tmp_path / "marked.dcm"
    ds = read_dataset(dx_from(NIH[34], tmp_path, "plain.dcm"))
    write_dataset(embed_dataset(ds, load_key(tmp_path / "wm.key")), marked)
    _, routed = _route(store, pipeline, marked, "WARD")
    assert (routed.state, routed.verdict, routed.trust) == ("done", "authentic", "watermarked")
    assert routed.details["calibration"]["as"] == "watermark"
    assert pipeline.calibration.counts()["WARD/DX"]["synthetic"] == 1


def test_readable_mr_is_not_quarantined_but_undecodable_pixels_are(gateway_parts):
    _, store, pipeline = gateway_parts()
    _, mr = _route(store, pipeline, MR_NATIVE, "MR_1")
    assert (mr.state, mr.verdict) == ("done", "unverifiable")
    assert "no content detector covers MR" in mr.reasons[-1]
    assert not any("unreadable" in r for r in mr.reasons)
    _, broken = _route(store, pipeline, RG2_JPLY, "CR_1")
    assert (broken.state, broken.verdict) == ("quarantined", "unverifiable")
    assert "unreadable pixel data" in broken.reasons[0]


def test_check_process_results_are_judged_in_the_gateway_process(gateway_parts, pki,
                                                                 tmp_path):
    """A check process has no database: it scans, and the gateway process records the
    known-real scores and judges against the source's calibration."""
    config, store, pipeline = gateway_parts(check_processes=1)
    pool = CheckPool(config)
    try:
        for i in range(9):
            path = _signed(pki, tmp_path, NIH[i], f"s{i}.dcm")
            data = path.read_bytes()
            store.ingest(data, header_of(data), source="dimse", calling_ae="DX_P")
            instance = store.claim()
            routing, observation = pool.check(store.file(instance), instance)
            assert routing.scan is not None and routing.scan.pixels is None
            pipeline.observe(instance, observation, routing)
            assert routing.verdict == "authentic"
        unsigned = dx_from(NIH[35], tmp_path, "u.dcm").read_bytes()
        store.ingest(unsigned, header_of(unsigned), source="dimse", calling_ae="DX_P")
        instance = store.claim()
        routing, observation = pool.check(store.file(instance), instance)
        assert routing.verdict == "unverifiable"  # the check process could not judge...
        pipeline.observe(instance, observation, routing)
        assert routing.details["calibration"]["status"] == "calibrated"  # ...the gateway did
        assert routing.verdict != "unverifiable"
    finally:
        pool.close()


def test_only_authentic_vouched_instances_feed_calibration_and_alarms_are_held(
        gateway_parts, pki, tmp_path):
    """A signed image whose watermark shows changed blocks is tampered: its scores never
    count. A signed image the source's calibrated detector would flag (a forgery signed
    with a stolen key, a phantom) is held for review, not counted, until accepted."""
    from radguard.dicom import read_dataset, write_dataset
    from radguard.provenance.sign import sign_file
    from radguard.watermark import embed_dataset, generate_key_file, load_key

    generate_key_file(tmp_path / "wm.key")
    # the detectors on every vouched image (not 1 in 20 once calibrated)
    _, store, pipeline = gateway_parts(watermark_key=str(tmp_path / "wm.key"),
                                       trust_signed_pixels=False)
    ds = embed_dataset(read_dataset(dx_from(NIH[40], tmp_path, "p.dcm")),
                       load_key(tmp_path / "wm.key"))
    pixels = ds.pixel_array.copy()
    pixels[100:140, 100:140] = 255 - pixels[100:140, 100:140]  # edited after marking...
    ds.PixelData = pixels.tobytes()
    write_dataset(ds, tmp_path / "edited.dcm")
    sign_file(tmp_path / "edited.dcm", tmp_path / "edited.signed.dcm", pki.signer)  # ...signed
    _, edited = _route(store, pipeline, tmp_path / "edited.signed.dcm", "DX_H")
    assert (edited.state, edited.verdict) == ("quarantined", "tampered")
    assert pipeline.calibration.counts() == {}
    for i in range(9):
        _route(store, pipeline, _signed(pki, tmp_path, NIH[50 + i], f"h{i}.dcm"), "DX_H")
    assert pipeline.calibration.calibrated_sources() == {"DX_H/DX"}
    fake = sorted((SHARED / "synthetic-gan-cxr" / "images").glob("*"))[0]
    instance, odd = _route(store, pipeline, _signed(pki, tmp_path, fake, "odd.dcm"), "DX_H")
    assert (odd.state, odd.verdict, odd.trust) == ("done", "authentic", "signed")
    assert "held for review" in odd.details["calibration"]["held"]
    assert pipeline.calibration.counts()["DX_H/DX"]["synthetic"] == 9  # not counted
    held = pipeline.calibration.held("DX_H/DX")
    assert [h["item"] for h in held] == [instance.sha256]
    assert pipeline.calibration.accept("DX_H/DX", instance.sha256) == 2
    assert pipeline.calibration.counts()["DX_H/DX"]["synthetic"] == 10
    assert pipeline.calibration.held() == []


def test_source_keys_escape_their_parts(gateway_parts, tmp_path):
    from radguard.forensics.scan import ScanResult
    from radguard.gateway.store import Instance

    _, _, pipeline = gateway_parts(forensics_source="calling_ae+station+modality")
    from dataclasses import fields

    def instance(ae):
        return Instance(**{**{f.name: None for f in fields(Instance)}, "calling_ae": ae,
                           "modality": "DX", "sha256": "00"})

    a, b = instance("A/B"), instance("A")
    key_a = pipeline.source_of(a, ScanResult("x", station="C", modality="DX"))
    key_b = pipeline.source_of(b, ScanResult("x", station="B/C", modality="DX"))
    assert key_a == "A%2FB/C/DX" and key_b == "A/B%2FC/DX"
    long = pipeline.source_of(a, ScanResult("x", station="S" * 500 + "\x1b[31m"))
    assert long == "A%2FB/" + "S" * 64 + "/DX"
