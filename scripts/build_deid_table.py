"""Rebuild radguard/governance/data/annex_e.json: PS3.15 Table E.1-1 with its option columns.

The basic-profile action of every attribute comes from the DICOM standard's Table E.1-1 as
published in dicom-anonymizer 2.1.0 (``dicomfields_2026c``, 655 attributes; its only job is to
carry that table). The option columns (retain longitudinal dates, UIDs, device and
institution identity, patient characteristics; clean descriptors, structured content,
graphics) are not in that package; they are transcribed here from the same table:
  * dates: every DA/DT/TM attribute is K under Retain Longitudinal Full Dates and C under
    Modified Dates, except Patient's Birth Date/Time (the table gives them no option);
  * UIDs: every U attribute (and the U* sequences) is K under Retain UIDs, except Digital
    Signature UID and the SR UID (0040,A124);
  * the other columns are the explicit tag lists below.

Run: python scripts/build_deid_table.py   (needs the dev extra: dicom-anonymizer)
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.datadict import dictionary_description, dictionary_VR

OUT = Path(__file__).resolve().parents[1] / "radguard" / "governance" / "data" / "annex_e.json"

CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
              "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
              "X_Z_U_STAR_TAGS": "X/Z/U*"}

CLEAN_DESCRIPTORS = """
00184000 00181400 001811BB 00189424 001021B0 00081084 00081080 00102110 300A00C3 300A00DD
00120072 00120051 00400310 00400280 300A02EB 3010000F 30100017 00180010 0018A003 0018937F
00082111 0016004B 00380040 300A0016 30100037 30100035 30100038 30100036 300A0676 300A0196
3010007F 300A0072 00209158 00084000 00204000 00402400 40080300 300A0742 300A0783 40080115
4008010B 22000002 00500021 0016002B 00102000 0018937B 00102180 00104000 00380500 00400254
300A000E 3010007B 30100081 30100061 00181030 300A0619 300A0623 300A067D 300A067C 300C0113
0040100A 00321030 3010005C 00402001 00401002 00321066 00321067 00400275 00321070 00401400
00321060 00189937 00189185 40084000 30060028 30060038 30060026 30060088 30060085 3010005A
300A0004 300A0002 300A0003 30100054 300A062A 30100056 00400007 0008103E 00380062 300A01B2
300A01A6 00400602 00400600 30060006 30060002 30060004 00324000 00081030 300A0608 30100077
3010007A 300A0734 30100033 30100034 00384000
"""
RETAIN_DEVICE = """
00181007 0018700A 00500020 3010002D 00181000 00181002 00181008 00181005 0016004F 00160050
00160051 0016004E 0018100B 30100043 00400241 00404030 00400242 00404028 00181004 00400011
00400001 00404027 00400010 00404025 00321020 00321021 300A0216 30080105 00081010 00185011
300A00B2 0018100A 00181009 00189371 00189373 00189367
"""
RETAIN_INSTITUTION = """
00120060 00120081 00120030 00120031 00080081 00081040 00081041 00080082 00080080
"""
RETAIN_PATIENT_CHARS = {  # tag -> action under Retain Patient Characteristics
    "00102110": "C", "00102160": "K", "00101010": "K", "00100040": "K", "00102203": "K",
    "00101020": "K", "00101030": "K", "00380500": "C", "001021C0": "K", "00400012": "C",
    "001021A0": "K", "00380050": "C",
}
CLEAN_STRUCTURED = "00400555 0040A730 00400610"
CLEAN_GRAPHICS = "50XXXXXX 60XX4000 60XX3000 00700001"
NO_UID_OPTION = {"04000100", "0040A124"}
NO_DATE_OPTION = {"00100030", "00100032"}


def _tag_text(tag: tuple[int, int]) -> str:
    return f"{tag[0]:04X}{tag[1]:04X}"


def _vr(tag: str) -> str:
    try:
        return dictionary_VR(int(tag, 16))
    except (KeyError, ValueError):
        return ""


# names of attributes newer than pydicom's dictionary, from the table's own comments
_COMMENTS = {f"{g}{e}".upper(): name.strip() for g, e, name in re.findall(
    r"\(0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4})\),\s*#\s*(.*)", inspect.getsource(table))}


def _name(tag: str) -> str:
    try:
        return dictionary_description(int(tag, 16))
    except (KeyError, ValueError):
        return _COMMENTS.get(tag) or {"50XXXXXX": "Curve Data", "60XX4000": "Overlay Comments",
                "60XX3000": "Overlay Data"}.get(tag, "")


def main() -> None:
    rows: dict[str, dict[str, object]] = {}
    for category, action in CATEGORIES.items():
        for tag in getattr(table, category):
            rows[_tag_text(tag)] = {"basic": action, "options": {}}
    for tag in ("50XXXXXX", "60XX4000", "60XX3000"):  # repeating groups, matched by mask
        rows.setdefault(tag, {"basic": "X", "options": {}})
    for tag, row in rows.items():
        opts: dict[str, str] = row["options"]  # type: ignore[assignment]
        vr = _vr(tag)
        if vr in ("DA", "DT", "TM") and tag not in NO_DATE_OPTION:
            opts["retain_dates"], opts["modified_dates"] = "K", "C"
        if "U" in str(row["basic"]) and tag not in NO_UID_OPTION:
            opts["retain_uids"] = "K"
        if tag in CLEAN_DESCRIPTORS.split():
            opts["clean_descriptors"] = "C"
        if tag in RETAIN_DEVICE.split():
            opts["retain_device"] = "K"
        if tag in RETAIN_INSTITUTION.split():
            opts["retain_institution"] = "K"
        if tag in RETAIN_PATIENT_CHARS:
            opts["retain_patient_chars"] = RETAIN_PATIENT_CHARS[tag]
        if tag in CLEAN_STRUCTURED.split():
            opts["clean_structured"] = "C"
        if tag in CLEAN_GRAPHICS.split():
            opts["clean_graphics"] = "C"
        row["name"] = _name(tag)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {"source": "DICOM PS3.15 Table E.1-1 (via dicom-anonymizer 2.1.0 "
                         "dicomfields_2026c) with option columns; see "
                         "scripts/build_deid_table.py",
               "attributes": dict(sorted(rows.items()))}
    OUT.write_text(json.dumps(payload, indent=0, sort_keys=True) + "\n")
    print(f"{len(rows)} attributes -> {OUT}")


if __name__ == "__main__":
    main()
