from radguard.dicom import is_valid_uid, new_uid


def test_new_uids_are_valid_and_unique(monkeypatch):
    uids = {new_uid() for _ in range(200)}
    assert len(uids) == 200 and all(is_valid_uid(u) for u in uids)
    monkeypatch.setenv("RADGUARD_UID_ROOT", "1.2.3.4")
    assert new_uid().startswith("1.2.3.4.")


def test_invalid_uids_are_rejected():
    for bad in ["", "1..2", "01.2", "1.2.a", "1." + "2" * 70]:
        assert not is_valid_uid(bad)
