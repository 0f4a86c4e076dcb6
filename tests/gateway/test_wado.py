"""WADO-RS and WADO-URI (PS3.18) against a running gateway over real sockets: retrieve
with transfer-syntax negotiation, metadata, bulk data, frames, rendered images in true
colour, WADO-URI, roles and quarantine, and dicomweb-client as a client."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import generate_uid

from radguard.dicom.web import split_multipart
from radguard.gateway.dimse import header_of
from tests.conftest import MR_NATIVE, RG2_JLS, RG2_JPLY
from tests.gateway.conftest import web_gateway

EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
STUDY, OTHER_STUDY, HELD_STUDY, BROKEN_STUDY = (generate_uid() for _ in range(4))
GREY, COLOUR, HELD, BIG = generate_uid(), generate_uid(), generate_uid(), generate_uid()


def _test_file(name: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    return Path(path)


def _multiframe(codec: str | None) -> pydicom.Dataset:
    """Three 64 x 64 16-bit frames (MR_small, changed per frame), compressed losslessly
    with ``codec`` - a multi-frame object in that syntax, made by pydicom's encoders."""
    ds = pydicom.dcmread(_test_file("MR_small.dcm"))
    base = ds.pixel_array.astype(np.int16)
    ds.PixelData = np.stack([base, base[::-1], base[:, ::-1] // 2]).tobytes()
    ds.NumberOfFrames = 3
    if codec:
        ds.compress(codec, generate_instance_uid=False)
    return ds


@dataclass
class Obj:
    """One stored test object: its UIDs, row and the dataset as pydicom decodes it."""

    name: str
    study: str
    series: str
    sop: str
    row: int
    path: Path

    @property
    def url(self) -> str:
        return f"/dicom-web/studies/{self.study}/series/{self.series}/instances/{self.sop}"

    def dataset(self) -> pydicom.Dataset:
        return pydicom.dcmread(self.path)


# name -> (source, series, state); a source is a pydicom test file or a built dataset
OBJECTS = {
    "ct": ("CT_small.dcm", GREY, "done"),
    "ct_mono1": ("CT_small.dcm", GREY, "done"),
    "rtdose": ("rtdose.dcm", GREY, "done"),  # 15 frames, 32 bit, implicit VR
    "rtdose_rle": ("rtdose_rle.dcm", GREY, "done"),  # 15 frames, RLE
    "mf_j2k": (J2K_LOSSLESS, GREY, "done"),
    "mf_jls": (JLS_LOSSLESS, GREY, "done"),
    "rgb_rle": ("SC_rgb_rle.dcm", COLOUR, "done"),
    "ybr_jpeg": ("examples_ybr_color.dcm", COLOUR, "done"),  # 30 frames, YBR_FULL_422 lossy
    "palette": ("examples_palette.dcm", COLOUR, "done"),
    "rgb_jpeg": ("SC_rgb_jpeg.dcm", COLOUR, "done"),
    # native YBR_FULL (the door refuses native YBR_FULL_422 as too short, see report)
    "ybr_native": ("SC_rgb_rle.dcm", COLOUR, "done"),
    "held": ("MR_small.dcm", HELD, "quarantined"),
    "gone": ("MR_small.dcm", GREY, "done"),  # in another study, its file removed
    # over 1 MiB: values stay in the mapped file, frames are read from there
    "big_jls": (str(RG2_JLS), BIG, "done"),
    "big_native": (str(MR_NATIVE), BIG, "done"),
    # a lossy JPEG whose stream is corrupt, let in undecoded (validate_compressed_pixels
    # off): served as stored, and 422 wherever it has to be decoded
    "corrupt": (str(RG2_JPLY), GREY, "done"),
    # stored byte for byte: implicit VR data under an explicit VR syntax (its own UIDs)
    "mismatch": ("SC_rgb_jpeg.dcm", "", "done"),
}


def _prepare(name: str, source: str, series: str, folder: Path) -> Path:
    if name == "mismatch":
        path = folder / f"{name}.dcm"
        path.write_bytes(_test_file(source).read_bytes())
        return path
    ds = _multiframe(source) if source.startswith("1.2.") else \
        pydicom.dcmread(source if "/" in source else _test_file(source))
    ds.StudyInstanceUID = {"gone": OTHER_STUDY, "held": HELD_STUDY,
                           "corrupt": BROKEN_STUDY}.get(name, STUDY)
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if name == "ct_mono1":
        ds.PhotometricInterpretation = "MONOCHROME1"
    if name == "ybr_native":
        ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
        ds.PixelData, ds.PhotometricInterpretation = ybr.tobytes(), "YBR_FULL"
        ds.file_meta.TransferSyntaxUID = EXPLICIT
    for _ in ds.iterall():  # SC_rgb_jpeg.dcm is implicit VR under an explicit VR syntax:
        pass  # converted elements get their VR, and the copy is what its syntax says
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki):
    folder = tmp_path_factory.mktemp("wado")
    gateway = web_gateway(folder / "data", start=False, trust=[str(pki.ca_cert_path)],
                          bulk_read_limit=10_000)
    gateway.objects = {}
    store = gateway.store
    for name, (source, series, state) in OBJECTS.items():
        path = _prepare(name, source, series, folder)
        data = path.read_bytes()
        header = header_of(data, name, decode_compressed=name != "corrupt")
        row = store.ingest(data, header, source="test")
        # decided before the workers start: these tests are about serving, not checking
        with store.transaction():
            store.execute("UPDATE instances SET state=? WHERE id=?", (state, row))
        gateway.objects[name] = Obj(name, header["study_uid"], header["series_uid"],
                                    header["sop_uid"], row, path)
    store.file(store.get(gateway.objects["gone"].row)).unlink()
    gateway.start()
    yield gateway
    gateway.stop()


def _get(gw, path: str, who: str | None = "rad", accept: str | None = None,
         host: str = "127.0.0.1") -> httpx.Response:
    headers = {}
    if who:
        headers["Authorization"] = f"Bearer {gw.tokens[who]}"
    if accept is not None:
        headers["Accept"] = accept
    return httpx.get(f"http://{host}:{gw.http_port}{path}", headers=headers, timeout=60,
                     trust_env=False)


def _parts(resp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("multipart/related")
    return split_multipart(resp.content, resp.headers["content-type"])


def _decode(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# -- roles, visibility, errors -------------------------------------------------------------------

def _all_routes(o: Obj) -> list[str]:
    study, series = f"/dicom-web/studies/{o.study}", f"/dicom-web/studies/{o.study}/series/" \
        f"{o.series}"
    return [study, series, o.url, f"{study}/metadata", f"{series}/metadata",
            f"{o.url}/metadata", f"{o.url}/bulkdata/7FE00010", f"{o.url}/frames/1",
            f"{study}/rendered", f"{series}/rendered", f"{o.url}/rendered",
            f"{o.url}/frames/1/rendered", f"{study}/thumbnail", f"{series}/thumbnail",
            f"{o.url}/thumbnail", f"{o.url}/frames/1/thumbnail",
            f"/wado?requestType=WADO&studyUID={o.study}&seriesUID={o.series}"
            f"&objectUID={o.sop}"]


def test_every_route_needs_a_reader(gw):
    for path in _all_routes(gw.objects["ct"]):
        assert _get(gw, path, who=None).status_code == 401, path
        assert _get(gw, path, who="aud").status_code == 403, path
        assert _get(gw, path).status_code == 200, path
        assert _get(gw, path, who="boss").status_code == 200, path


def test_quarantined_objects_are_for_admins_only(gw):
    held = gw.objects["held"]
    for path in _all_routes(held):
        assert _get(gw, path).status_code == 404, path
        assert _get(gw, path, who="boss").status_code == 200, path


def test_an_object_whose_encoding_contradicts_its_syntax_is_transcoded(gw):
    o = gw.objects["mismatch"]
    ds = _decode(_parts(_get(gw, o.url))[0][1])
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT and ds.ImageType[0] == "DERIVED"
    assert np.array_equal(ds.pixel_array, o.dataset().pixel_array)


def test_undecodable_pixel_data_is_422_and_still_served_as_stored(gw):
    o = gw.objects["corrupt"]
    for path, accept in ((o.url, None), (f"{o.url}/rendered", None),
                         (f"{o.url}/frames/1", OCTET_MULTI),
                         (_uri(o, contentType="image/png"), None)):
        resp = _get(gw, path, accept=accept)
        assert resp.status_code == 422, path
        assert "decode" in resp.json()["error"] and "Traceback" not in resp.text
    as_stored = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    assert _parts(_get(gw, o.url, accept=as_stored))[0][1] == o.path.read_bytes()
    jpeg = _parts(_get(gw, f"{o.url}/frames/1", accept='multipart/related; type="image/jpeg"'))
    assert jpeg[0][1] == next(generate_frames(o.dataset().PixelData, number_of_frames=1))


def test_bulk_reads_raise_the_alarm(tmp_path):
    gateway = web_gateway(tmp_path / "data", start=False, bulk_read_limit=2)
    data = _prepare("ct", "CT_small.dcm", GREY, tmp_path).read_bytes()
    header = header_of(data)
    row = gateway.store.ingest(data, header, source="test")
    with gateway.store.transaction():
        gateway.store.execute("UPDATE instances SET state='done' WHERE id=?", (row,))
    o = Obj("ct", header["study_uid"], header["series_uid"], header["sop_uid"], row, tmp_path)
    gateway.start()
    try:
        for path in (o.url, f"{o.url}/frames/1", _uri(o, contentType="application/dicom"),
                     o.url):
            assert _get(gateway, path, accept="*/*").status_code == 200
        # headers and renderings are patient data too: they count for the boss's alarm
        for path in (f"/dicom-web/studies/{o.study}/metadata", f"{o.url}/rendered",
                     f"/dicom-web/studies/{o.study}/rendered"):
            assert _get(gateway, path, who="boss", accept="*/*").status_code == 200
    finally:
        gateway.stop()
    alarms = [e for e in gateway.audit_log.entries() if e.action == "alarm.bulk_read"]
    assert [a.target for a in alarms] == ["rad", "boss"]


def test_malformed_uids_and_missing_files(gw):
    ct = gw.objects["ct"]
    for path in ("/dicom-web/studies/1..2", f"/dicom-web/studies/{ct.study}/series/x.1",
                 f"/dicom-web/studies/1.{'2' * 70}/metadata",
                 f"{ct.url}/frames/1".replace(ct.sop, "1.2.a")):
        assert _get(gw, path).status_code == 400, path
    gone = gw.objects["gone"]
    for path in (gone.url, f"{gone.url}/metadata", f"{gone.url}/rendered"):
        resp = _get(gw, path)
        assert resp.status_code == 503 and "Traceback" not in resp.text, path


# -- retrieve and transfer syntaxes --------------------------------------------------------------

def test_retrieve_as_stored_is_the_file_itself(gw):
    for name in ("rtdose", "rgb_rle", "ybr_jpeg"):
        o = gw.objects[name]
        parts = _parts(_get(gw, o.url, accept='multipart/related; type="application/dicom"; '
                                              'transfer-syntax=*'))
        assert len(parts) == 1 and parts[0][1] == o.path.read_bytes()
        stored = o.dataset().file_meta.TransferSyntaxUID
        assert parts[0][0]["content-type"] == f"application/dicom; transfer-syntax={stored}"


def test_default_syntax_is_explicit_little_endian_and_pixels_survive(gw):
    for name in ("rtdose", "rtdose_rle", "mf_j2k", "ybr_jpeg", "ct"):
        o = gw.objects[name]
        for accept in ('multipart/related; type="application/dicom"', "application/dicom",
                       None):
            parts = _parts(_get(gw, o.url, accept=accept))
            ds = _decode(parts[0][1])
            assert ds.file_meta.TransferSyntaxUID == EXPLICIT, name
            assert parts[0][0]["content-type"].endswith(f"transfer-syntax={EXPLICIT}")
            assert np.array_equal(ds.pixel_array, o.dataset().pixel_array), name
            assert ds.SOPInstanceUID == o.sop
    # a lossy original decompressed says so
    lossy = _decode(_parts(_get(gw, gw.objects["ybr_jpeg"].url))[0][1])
    assert lossy.LossyImageCompression == "01" and lossy.PhotometricInterpretation == "RGB"


@pytest.mark.parametrize("syntax", [RLE, J2K_LOSSLESS, JLS_LOSSLESS])
def test_transcoding_to_a_lossless_syntax(gw, syntax):
    for name in ("ct", "mf_j2k"):
        o = gw.objects[name]
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
        parts = _parts(_get(gw, o.url, accept=accept))
        ds = _decode(parts[0][1])
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert parts[0][0]["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        assert np.array_equal(ds.pixel_array, o.dataset().pixel_array), (name, syntax)


def test_lossy_objects_are_never_recompressed_and_unknown_types_refused(gw):
    lossy = gw.objects["ybr_jpeg"]
    for syntax in (J2K_LOSSLESS, RLE, "1.2.840.10008.1.2.4.91"):
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
        assert _get(gw, lossy.url, accept=accept).status_code == 406
    # the next acceptable choice is taken when the first cannot be
    accept = (f'multipart/related; type="application/dicom"; transfer-syntax={RLE}, '
              f'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5')
    parts = _parts(_get(gw, lossy.url, accept=accept))
    assert parts[0][1] == lossy.path.read_bytes()
    # a lossless object asked for a syntax no encoder writes losslessly
    ct = gw.objects["ct"]
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert _get(gw, ct.url, accept=accept).status_code == 406
    assert _get(gw, ct.url, accept="image/png").status_code == 406
    assert _get(gw, f"/dicom-web/studies/{STUDY}", accept="text/plain").status_code == 406


def test_series_and_study_retrieve(gw):
    grey = [o for o in gw.objects.values() if o.series == GREY and o.study == STUDY]
    parts = _parts(_get(gw, f"/dicom-web/studies/{STUDY}/series/{GREY}",
                        accept='multipart/related; type="application/dicom"; '
                               'transfer-syntax=*'))
    assert sorted(_decode(p[1]).SOPInstanceUID for p in parts) == sorted(o.sop for o in grey)
    study = _parts(_get(gw, f"/dicom-web/studies/{STUDY}"))
    assert len(study) == len([o for o in gw.objects.values() if o.study == STUDY
                              and o.name != "held"])
    assert {_decode(p[1]).file_meta.TransferSyntaxUID for p in study} == {EXPLICIT}


# -- metadata and bulk data ----------------------------------------------------------------------

def test_metadata_is_dicom_json_with_resolvable_bulk_data(gw):
    resp = _get(gw, f"/dicom-web/studies/{STUDY}/series/{GREY}/metadata", host="localhost")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/dicom+json")
    objects = resp.json()
    by_sop = {o.sop: o for o in gw.objects.values()}
    assert len(objects) == len([o for o in gw.objects.values() if o.series == GREY
                                and o.study == STUDY])
    fetched = []

    def bulk(tag: str, vr: str, uri: str) -> bytes:
        assert uri.startswith(f"http://localhost:{gw.http_port}/dicom-web/studies/")
        path = uri.split(str(gw.http_port), 1)[1]
        parts = _parts(_get(gw, path, accept='multipart/related; '
                                             'type="application/octet-stream"'))
        fetched.append(tag)
        return b"".join(p[1] for p in parts)

    for obj in objects:
        assert "BulkDataURI" in obj["7FE00010"] and "InlineBinary" not in obj["7FE00010"]
        ds = pydicom.Dataset.from_json(obj, bulk_data_uri_handler=bulk)
        o = by_sop[ds.SOPInstanceUID]
        original = o.dataset()
        assert ds.PatientName == original.PatientName and ds.Rows == original.Rows
        if o.name in ("rtdose", "ct"):  # native: the bulk data is the pixel data value
            assert ds.PixelData == original.PixelData
    assert fetched.count("7FE00010") == len(objects)
    one = _get(gw, f"{gw.objects['ct'].url}/metadata").json()
    assert len(one) == 1 and one[0]["00080018"]["Value"] == [gw.objects["ct"].sop]
    assert len(_get(gw, f"/dicom-web/studies/{STUDY}/metadata").json()) > len(objects)


def test_bulkdata_route_refusals(gw):
    ct = gw.objects["ct"]
    assert _get(gw, f"{ct.url}/bulkdata/zz").status_code == 400
    assert _get(gw, f"{ct.url}/bulkdata/00100010").status_code == 404  # not binary
    assert _get(gw, f"{ct.url}/bulkdata/7FE00010", accept="image/png").status_code == 406


# -- frames --------------------------------------------------------------------------------------

OCTET_MULTI = 'multipart/related; type="application/octet-stream"'


@pytest.mark.parametrize("name", ["rtdose", "rtdose_rle", "mf_j2k", "mf_jls", "ybr_jpeg"])
def test_frames_are_bit_exact_native_bytes(gw, name):
    o = gw.objects[name]
    arr = o.dataset().pixel_array
    wanted = [2, 3] if arr.ndim >= 3 and len(arr) > 2 else [1, 2]
    parts = _parts(_get(gw, f"{o.url}/frames/{','.join(map(str, wanted))}",
                        accept=OCTET_MULTI))
    assert len(parts) == len(wanted)
    for (headers, data), n in zip(parts, wanted, strict=True):
        assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
        frame = arr[n - 1]
        assert data == frame.astype(frame.dtype.newbyteorder("<")).tobytes(), (name, n)
    bare = _get(gw, f"{o.url}/frames/{wanted[0]}", accept="application/octet-stream")
    assert bare.status_code == 200 and bare.content == parts[0][1]


def test_compressed_frames_as_stored(gw):
    o = gw.objects["mf_j2k"]
    ds = o.dataset()
    stored = list(generate_frames(ds.PixelData, number_of_frames=3))
    for accept in ('multipart/related; type="image/jp2"',
                   f'multipart/related; type="image/jp2"; transfer-syntax={J2K_LOSSLESS}',
                   'multipart/related; type="application/octet-stream"; transfer-syntax=*'):
        parts = _parts(_get(gw, f"{o.url}/frames/3,1", accept=accept))
        assert [p[1] for p in parts] == [stored[2], stored[0]]
        assert parts[0][0]["content-type"].endswith(f"transfer-syntax={J2K_LOSSLESS}")
    rle = gw.objects["rtdose_rle"]
    parts = _parts(_get(gw, f"{rle.url}/frames/15", accept='multipart/related; '
                                                           'type="image/x-dicom-rle"'))
    assert parts[0][1] == list(generate_frames(rle.dataset().PixelData,
                                               number_of_frames=15))[14]
    # asked for a compressed kind the object is not stored in, with no alternative
    assert _get(gw, f"{o.url}/frames/1", accept='multipart/related; type="image/jls"'
                ).status_code == 406


def test_large_objects_frames_and_metadata_from_the_mapped_file(gw):
    jls, native = gw.objects["big_jls"], gw.objects["big_native"]
    assert jls.path.stat().st_size > 1 << 20 and native.path.stat().st_size > 1 << 20
    stored = next(generate_frames(jls.dataset().PixelData, number_of_frames=1))
    parts = _parts(_get(gw, f"{jls.url}/frames/1", accept='multipart/related; '
                                                          'type="image/jls"'))
    assert parts[0][1] == stored
    decoded = _parts(_get(gw, f"{jls.url}/frames/1", accept=OCTET_MULTI))
    assert decoded[0][1] == jls.dataset().pixel_array.tobytes()
    raw = _parts(_get(gw, f"{native.url}/frames/1", accept=OCTET_MULTI))
    assert raw[0][1] == native.dataset().PixelData
    for o in (jls, native):
        meta = _get(gw, f"{o.url}/metadata").json()[0]
        assert meta["7FE00010"]["BulkDataURI"].endswith(f"{o.sop}/bulkdata/7FE00010")
        assert meta["00280010"]["Value"] == [o.dataset().Rows]


def test_frame_numbers_are_checked(gw):
    o = gw.objects["rtdose"]
    for bad in ("0", "a", "1,,2", "1,", "-1", "1.5"):
        assert _get(gw, f"{o.url}/frames/{bad}", accept=OCTET_MULTI).status_code == 400, bad
    assert _get(gw, f"{o.url}/frames/16", accept=OCTET_MULTI).status_code == 404
    assert _get(gw, f"{o.url}/frames/1,99", accept=OCTET_MULTI).status_code == 404
    # OHIF's Accept (no quotes, as stored): native objects come uncompressed
    ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    parts = _parts(_get(gw, f"{o.url}/frames/4", accept=ohif))
    assert parts[0][1] == o.dataset().pixel_array[3].tobytes()
    assert parts[0][0]["content-type"].endswith(f"transfer-syntax={EXPLICIT}")
    # dicomweb-client's default Accept (*/*): octet-stream parts
    parts = _parts(_get(gw, f"{o.url}/frames/1", accept='multipart/related; type="*/*"'))
    assert parts[0][0]["content-type"].startswith("application/octet-stream")


# -- rendered ------------------------------------------------------------------------------------

def _expected_rgb(o: Obj) -> np.ndarray:
    """pydicom's own true-colour first frame of a colour object, in 8 bits."""
    ds = o.dataset()
    arr = ds.pixel_array
    first = arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(first, ds).astype(np.float64)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return np.round(rgb * 255 / ((1 << bits) - 1)).astype(np.uint8)
    return first


@pytest.mark.parametrize("name", ["rgb_rle", "ybr_jpeg", "palette", "rgb_jpeg",
                                  "ybr_native"])
def test_colour_renders_in_true_colour(gw, name):
    o = gw.objects[name]
    expected = _expected_rgb(o).astype(int)
    png = _get(gw, f"{o.url}/rendered", accept="image/png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    got = _image(png.content).astype(int)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1, name
    jpeg = _get(gw, f"{o.url}/rendered?quality=95")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert np.abs(_image(jpeg.content).astype(int) - expected).mean() < 8, name
    # the web UI draws the same colours (it used to draw them grey)
    ui = httpx.get(f"http://127.0.0.1:{gw.http_port}/instances/{o.row}/image.png",
                   headers={"Authorization": f"Bearer {gw.tokens['rad']}"}, timeout=60,
                   trust_env=False)
    assert ui.status_code == 200
    shown = _image(ui.content).astype(int)
    if shown.shape == expected.shape:
        assert np.abs(shown - expected).max() <= 1, name
    else:  # shrunk to the page's 768 px
        assert shown.ndim == 3 and shown.shape[2] == 3


def test_grey_rendering_windows_and_monochrome1(gw):
    ct, mono1 = gw.objects["ct"], gw.objects["ct_mono1"]
    normal = _image(_get(gw, f"{ct.url}/rendered", accept="image/png").content).astype(int)
    inverted = _image(_get(gw, f"{mono1.url}/rendered", accept="image/png").content)
    assert np.array_equal(255 - normal, inverted.astype(int))
    ds = ct.dataset()
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    narrow = _image(_get(gw, f"{ct.url}/rendered?window=40,400,linear_exact",
                         accept="image/png").content).astype(int)
    expected = np.clip(((hu - 40) / 400 + 0.5) * 255, 0, 255)
    assert np.abs(narrow - expected).max() <= 1
    sigmoid = _get(gw, f"{ct.url}/rendered?window=40,400,sigmoid", accept="image/png")
    assert sigmoid.status_code == 200 and not np.array_equal(_image(sigmoid.content), narrow)
    for bad in ("window=40", "window=a,b", "window=40,0", "window=40,400,cubic",
                "viewport=a,b", "viewport=0,0", "quality=0", "quality=x"):
        assert _get(gw, f"{ct.url}/rendered?{bad}").status_code == 400, bad
    small = _image(_get(gw, f"{ct.url}/rendered?viewport=64,32").content)
    assert small.shape[:2] == (32, 32)  # 128 x 128 fitted into 64 x 32
    assert _get(gw, f"{ct.url}/rendered", accept="image/gif").status_code == 406
    assert _get(gw, f"{ct.url}/rendered?accept=image/png").headers["content-type"] == \
        "image/png"


def test_frames_thumbnails_and_multipart_rendered(gw):
    o = gw.objects["ybr_jpeg"]
    arr = o.dataset().pixel_array
    frame = _image(_get(gw, f"{o.url}/frames/7/rendered", accept="image/png").content)
    assert np.abs(frame.astype(int) - arr[6].astype(int)).max() <= 1
    assert _get(gw, f"{o.url}/frames/31/rendered").status_code == 404
    thumb = _image(_get(gw, f"{o.url}/thumbnail").content)
    assert max(thumb.shape[:2]) == 128 and thumb.ndim == 3
    series = _get(gw, f"/dicom-web/studies/{STUDY}/series/{COLOUR}/thumbnail")
    assert series.status_code == 200 and series.headers["content-type"] == "image/jpeg"
    parts = _parts(_get(gw, f"/dicom-web/studies/{STUDY}/series/{COLOUR}/rendered",
                        accept='multipart/related; type="image/png"'))
    assert len(parts) == 5 and all(p[1][:4] == b"\x89PNG" for p in parts)


# -- WADO-URI ------------------------------------------------------------------------------------

def _uri(o: Obj, **extra: str) -> str:
    query = {"requestType": "WADO", "studyUID": o.study, "seriesUID": o.series,
             "objectUID": o.sop, **extra}
    return "/wado?" + "&".join(f"{k}={v}" for k, v in query.items())


def test_what_one_request_may_cost_is_bounded(gw):
    """Found in review: 8,000 copies of frame 1 in one frames request, a 60,000-pixel
    WADO-URI rendering of a 512-pixel image, study metadata outside the bulk-read count."""
    o = gw.objects["rtdose"]
    assert _get(gw, f"{o.url}/frames/1,1", accept=OCTET_MULTI).status_code == 400
    many = ",".join(str(n) for n in range(1, 1002))
    assert _get(gw, f"{o.url}/frames/{many}", accept=OCTET_MULTI).status_code == 400
    assert _get(gw, _uri(o, contentType="image/png", rows="60000")).status_code == 400
    assert _get(gw, f"{o.url}/rendered?viewport=9000,9000").status_code == 400
    answer = _get(gw, f"/dicom-web/studies/{o.study}/metadata")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert len(answer.json()) >= 1


def test_wado_uri(gw):
    o = gw.objects["rtdose_rle"]
    resp = _get(gw, _uri(o, contentType="application/dicom"))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom"
    ds = _decode(resp.content)
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(ds.pixel_array, o.dataset().pixel_array)
    same = _get(gw, _uri(o, contentType="application/dicom", transferSyntax=RLE))
    assert same.content == o.path.read_bytes()
    jpeg = _get(gw, _uri(gw.objects["rgb_rle"]))
    assert jpeg.headers["content-type"] == "image/jpeg" and _image(jpeg.content).ndim == 3
    ct = gw.objects["ct"]
    png = _get(gw, _uri(ct, contentType="image/png", windowCenter="40", windowWidth="400",
                        rows="64"))
    assert png.headers["content-type"] == "image/png" and _image(png.content).shape == (64, 64)
    frame = _get(gw, _uri(gw.objects["ybr_jpeg"], contentType="image/png", frameNumber="3"))
    expected = gw.objects["ybr_jpeg"].dataset().pixel_array[2].astype(int)
    assert np.abs(_image(frame.content).astype(int) - expected).max() <= 1
    for bad in ({"requestType": "WADX"}, {"objectUID": ""}, {"studyUID": "1..2"},
                {"windowCenter": "40"}, {"rows": "0"}, {"frameNumber": "x"},
                {"transferSyntax": "nope"}, {"anonymize": "yes"}):
        assert _get(gw, _uri(ct, **bad)).status_code == 400, bad
    assert _get(gw, "/wado?requestType=WADO").status_code == 400
    assert _get(gw, _uri(ct, contentType="text/plain")).status_code == 406
    lossy = _uri(gw.objects["ybr_jpeg"], contentType="application/dicom",
                 transferSyntax=J2K_LOSSLESS)
    assert _get(gw, lossy).status_code == 406


# -- dicomweb-client -----------------------------------------------------------------------------

def test_dicomweb_client_reads_everything(gw):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"http://127.0.0.1:{gw.http_port}/dicom-web",
                            headers={"Authorization": f"Bearer {gw.tokens['rad']}"})
    study = client.retrieve_study(STUDY)
    assert {ds.file_meta.TransferSyntaxUID for ds in study} == {EXPLICIT}
    assert len(study) == len([o for o in gw.objects.values() if o.study == STUDY
                              and o.name != "held"])
    metadata = client.retrieve_series_metadata(STUDY, GREY)
    assert {m["00080018"]["Value"][0] for m in metadata} == \
        {o.sop for o in gw.objects.values() if o.series == GREY and o.study == STUDY}
    for name in ("rtdose", "mf_j2k"):
        o = gw.objects[name]
        arr = o.dataset().pixel_array
        frames = client.retrieve_instance_frames(
            STUDY, o.series, o.sop, frame_numbers=[1, 3],
            media_types=("application/octet-stream",))
        assert frames == [arr[0].tobytes(), arr[2].tobytes()]
        default = client.retrieve_instance_frames(STUDY, o.series, o.sop, frame_numbers=[2])
        assert default == [arr[1].tobytes()]
    rgb = gw.objects["rgb_rle"]
    png = client.retrieve_instance_rendered(STUDY, rgb.series, rgb.sop,
                                            media_types=("image/png",))
    assert np.abs(_image(png).astype(int) - _expected_rgb(rgb).astype(int)).max() <= 1
    jpeg = client.retrieve_instance_rendered(STUDY, rgb.series, rgb.sop)
    assert jpeg[:2] == b"\xff\xd8"
    instance = client.retrieve_instance(STUDY, rgb.series, rgb.sop)
    assert np.array_equal(instance.pixel_array, rgb.dataset().pixel_array)


def test_reads_are_audited(gw):
    ct = gw.objects["ct"]
    _get(gw, f"{ct.url}/rendered")
    entries = gw.audit_log.entries()
    assert any(e.action == "http.access" and ct.sop in e.target for e in entries)
    assert any(e.action == "image.view" and e.target == ct.sop for e in entries)
    assert json.dumps([e.action for e in entries])  # the log reads back


# -- units: VOI LUT rendering, Accept parsing ----------------------------------------------------

def test_voi_lut_sequence_renders_through_the_lut(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from radguard.dicom.io import read_dataset
    from radguard.gateway.wado import render_pixels

    ds = pydicom.dcmread(_test_file("CT_small.dcm"))
    for keyword in ("WindowCenter", "WindowWidth"):
        ds.pop(keyword, None)
    lut = Dataset()
    first, entries = -1000, 2048
    lut.add_new(0x00283002, "SS", [entries, first, 16])  # LUTDescriptor
    lut.add_new(0x00283006, "US", [min(65535, i * 40) for i in range(entries)])  # LUTData
    ds.VOILUTSequence = [lut]
    ds.save_as(tmp_path / "voi.dcm", enforce_file_format=True)
    got = render_pixels(read_dataset(tmp_path / "voi.dcm")).astype(int)
    values = apply_modality_lut(ds.pixel_array, ds)
    expected = np.round(apply_voi_lut(values, ds, prefer_lut=True).astype(float) * 255 / 65535)
    assert np.abs(got - expected).max() <= 1
    assert len(np.unique(got)) > 10  # the ramp shows, not a constant


def test_accept_parsing():
    from radguard.gateway.wado import parse_accept

    ranges = parse_accept('image/png;q=0.5, multipart/related; type="application/dicom";'
                          ' transfer-syntax=1.2.840.10008.1.2.5, */*;q=0')
    assert [r.type for r in ranges] == ["multipart/related", "image/png"]
    assert ranges[0].part_type == "application/dicom" and ranges[0].syntax == RLE
    assert parse_accept(None)[0].type == "*/*"
