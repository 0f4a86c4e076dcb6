from radguard.dicom import is_valid_uid, new_uid


def test_new_uids_are_valid_and_unique(monkeypatch):
    uids = {new_uid() for _ in range(200)}
    assert len(uids) == 200 and all(is_valid_uid(u) for u in uids)
    monkeypatch.setenv("RADGUARD_UID_ROOT", "1.2.3.4")
    assert new_uid().startswith("1.2.3.4.")


def test_invalid_uids_are_rejected():
    for bad in ["", "1..2", "01.2", "1.2.a", "1." + "2" * 70]:
        assert not is_valid_uid(bad)


def test_a_trailing_newline_is_not_part_of_a_valid_uid():
    assert not is_valid_uid("1.2.3\n")


def test_uid_problem_admits_what_real_archives_hold_and_nothing_else():
    from radguard.dicom.uids import uid_problem

    for fine in ["1.2.3", "1.2.3\0", "1.2.3 ", "1.2.840.0113619.2.1", "0.0"]:
        assert uid_problem(fine) is None, fine
    for bad, why in [("", "empty"), ("1.2.", "empty component"), (".1", "empty component"),
                     ("1.2\n", "other than digits"), ("1.\u0663", "other than digits"),
                     ("1<b>", "other than digits"), ("1." * 40 + "1", "at most 64")]:
        problem = uid_problem(bad, "Study Instance UID")
        assert problem and why in problem and problem.startswith("Study Instance UID"), bad
        assert "<b>" not in problem
