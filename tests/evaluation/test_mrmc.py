"""MRMC reader-study analysis (radguard.evaluation.mrmc, `radguard reader-study analyze`).

Validation against the established programs on their own worked examples. Every reference
number below is copied from the output a named program printed for that data set:

* IOWA = OR-DBM MRMC 2.51 (Schartz, Hillis, Pesce, Berbaum; build 20181028), trapezoidal AUC,
  jackknife covariances; output files shipped in RJafroc (github.com/dpc10ster/RJafroc):
  ``inst/IowaResults/VanDyke.txt`` (commit 6c96b923) and ``inst/Iowa/FedRoc.txt``
  (commit 36646d99).
* JAFROC = JAFROC 4.2.1 (Windows, Chakraborty), DBM analysis, output files in RJafroc
  ``inst/JAFROC/VanDykeROC.txt`` and ``inst/JAFROC/FedRoc.txt`` (commit 36646d99). JAFROC
  computes in single precision: its mean squares agree with IOWA / ours to ~1e-6 relative.
* MRMCAOV = MRMCaov R package (Smith, Hillis, Pesce), README of v0.1.5
  (github.com/brian-j-smith/MRMCaov): ``summary(mrmc(empirical_auc(truth, rating),
  treatment, reader, case, data = VanDyke))`` (default ``cov = jackknife``).
* RJAFROC = RJafroc, ``St(dataset03, FOM = "Wilcoxon", method = "OR")`` and
  ``method = "DBM"`` as printed in the RJafroc book, chapters "OR analysis text output" and
  "DBM analysis text output" (github.com/dpc10ster/RJafrocBook). dataset03 = Franken.

The reference programs report "treatment 1 - treatment 2"; radguard reports the second
modality minus the first, so differences and CIs appear here with the sign flipped.
The data sets are ../shared/data/reader-study-{vandyke,franken,fedroc}/ratings.csv.
"""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.errors import RadguardError
from radguard.evaluation import mrmc
from radguard.evaluation.metrics import delong_auc
from tests.conftest import SHARED

VANDYKE = SHARED / "reader-study-vandyke" / "ratings.csv"
FRANKEN = SHARED / "reader-study-franken" / "ratings.csv"
FEDROC = SHARED / "reader-study-fedroc" / "ratings.csv"

D4 = 5e-5  # "to 4 decimals"


def close(ours: float, published: float, abs_tol: float = D4) -> bool:
    return math.isclose(ours, published, rel_tol=0.0, abs_tol=abs_tol)


@pytest.fixture(scope="module")
def vandyke():
    return mrmc.read_ratings(VANDYKE)


@pytest.fixture(scope="module")
def franken():
    return mrmc.read_ratings(FRANKEN)


@pytest.fixture(scope="module")
def fedroc():
    return mrmc.read_ratings(FEDROC)


# -- the figure of merit -------------------------------------------------------------------

def test_auc_by_hand():
    # 3 non-diseased (1, 2, 3) x 2 diseased (2, 4): pairs won 1, 1, 1, 1, 0; one tie (2, 2)
    # counts one half -> 4.5 / 6
    assert mrmc.empirical_auc(np.array([1, 2, 3]), np.array([2, 4])) == 0.75
    assert mrmc.empirical_auc(np.array([0, 0]), np.array([1, 1])) == 1.0
    assert mrmc.empirical_auc(np.array([5, 5]), np.array([5, 5])) == 0.5


def test_jackknife_closed_form_equals_brute_force(franken):
    jk = mrmc.jackknife_aucs(franken)
    keep = np.ones(len(franken.cases), dtype=bool)
    for k in (0, 5, 40, 99):  # non-diseased and diseased cases
        keep[:] = True
        keep[k] = False
        y = franken.truth[keep]
        for i in range(2):
            for j in range(len(franken.readers)):
                x = franken.ratings[i, j, keep]
                auc = mrmc.empirical_auc(x[y == 0], x[y == 1])
                assert jk[i, j, k] == pytest.approx(auc, abs=1e-12)


def test_delong_covariance_diagonal_matches_metrics_delong(vandyke):
    v_neg, v_pos = mrmc._components(vandyke)
    cov = mrmc.delong_covariance(v_neg, v_pos)
    r = len(vandyke.readers)
    for i in range(2):
        for j in range(r):
            se = delong_auc(vandyke.truth, vandyke.ratings[i, j]).se
            assert cov[i * r + j, i * r + j] == pytest.approx(se ** 2, rel=1e-12)


# -- Van Dyke (5 readers x 2 modalities x 114 cases) ---------------------------------------

VANDYKE_AUCS = [  # IOWA "TREATMENT x READER AUC ESTIMATES"
    [0.91964573, 0.85877617, 0.90386473, 0.97310789, 0.82979066],
    [0.94782609, 0.90531401, 0.92173913, 0.99935588, 0.92995169],
]


def test_vandyke_orh_rrrc(vandyke):
    res = mrmc.analyze(vandyke)
    out = res.to_dict()
    assert np.allclose(res.aucs, VANDYKE_AUCS, atol=5e-9)
    assert close(out["fom"]["1"], 0.89703704, 5e-9)  # IOWA treatment means
    assert close(out["fom"]["2"], 0.94083736, 5e-9)
    assert close(out["difference"], 0.04380032, 5e-9)  # IOWA 1 - 2 = -0.04380032
    c = res.components  # IOWA variance components; MRMCAOV to 10 digits
    assert close(c["var"], 0.0008022883, 5e-11)
    assert close(c["cov1"], 0.0003466137, 5e-11)
    assert close(c["cov2"], 0.0003440748, 5e-11)
    assert close(c["cov3"], 0.0002390284, 5e-11)
    assert close(c["var_r"], 0.0015349993, 5e-11)
    assert close(c["var_tr"], 0.0002004025, 5e-11)
    assert close(c["ms_t"], 0.00479617, 5e-9)
    assert close(c["ms_r"], 0.00383620, 5e-9)
    assert close(c["ms_tr"], 0.00055103, 5e-9)
    # MRMCAOV global test: F 4.456319, df2 15.25967, p 0.05166569 (IOWA: 4.46, 15.26, .0517)
    assert close(out["f"], 4.456319, 5e-7)
    assert close(out["ddf"], 15.25967, 5e-6)
    assert close(out["p"], 0.05166569, 5e-9)
    # MRMCAOV 1 - 2: SE 0.02074862, CI (-0.0879594986, 0.0003588544)
    assert close(res.main.comparisons[0].se, 0.02074862, 5e-9)
    assert close(out["ci95"][0], -0.0003588544, 5e-10)
    assert close(out["ci95"][1], 0.0879594986, 5e-10)
    # single-modality CIs, IOWA part (c) / MRMCAOV: SE, df, CI
    est, se, df, low, high = res.main.modality_ci["1"]
    assert (close(se, 0.03317360, 5e-9) and close(df, 12.74465, 5e-6)
            and close(low, 0.8252236, 5e-8) and close(high, 0.9688505, 5e-8))
    est, se, df, low, high = res.main.modality_ci["2"]
    assert (close(se, 0.02156637, 5e-9) and close(df, 12.71019, 5e-6)
            and close(low, 0.8941378, 5e-8) and close(high, 0.9875369, 5e-8))


def test_vandyke_orh_frrc_rrfc(vandyke):
    res = mrmc.analyze(vandyke)
    frrc, rrfc = res.tests["frrc"], res.tests["rrfc"]
    # IOWA analysis 2: X2(1) = 5.47595, p .0193; 1 - 2: SE 0.01872, CI (-0.08049, -0.00711)
    assert math.isinf(frrc.ddf)
    assert close(frrc.f * frrc.ndf, 5.47595, 5e-6)
    assert close(frrc.p, 0.0193)
    cmp = frrc.comparisons[0]
    assert close(cmp.se, 0.01872, 5e-6)
    assert close(cmp.low, 0.00711, 5e-6) and close(cmp.high, 0.08049, 5e-6)
    # IOWA analysis 3: F(1,4) = 8.70, p .0420; SE 0.01485, CI (-0.08502, -0.00258)
    assert rrfc.ddf == 4
    assert close(rrfc.f, 0.00479617 / 0.00055103, 5e-4) and close(rrfc.p, 0.0420)
    cmp = rrfc.comparisons[0]
    assert close(cmp.se, 0.01485, 5e-6)
    assert close(cmp.low, 0.00258, 5e-6) and close(cmp.high, 0.08502, 5e-6)
    # IOWA analysis 2 (c): single-treatment SEs 0.02428971, 0.01677632
    assert close(frrc.modality_ci["1"][1], 0.02428971, 5e-9)
    assert close(frrc.modality_ci["2"][1], 0.01677632, 5e-9)


def test_vandyke_dbm(vandyke):
    res = mrmc.analyze(vandyke, analysis="dbm")
    ms = res.components
    published = {"ms_t": 0.54676316, "ms_r": 0.43732679, "ms_c": 0.39686891,  # JAFROC
                 "ms_tr": 0.06281753, "ms_tc": 0.09984813, "ms_rc": 0.06450099,
                 "ms_trc": 0.03997167}
    for key, value in published.items():
        assert ms[key] == pytest.approx(value, rel=1e-5), key  # JAFROC: single precision
    # IOWA "Corresponding DBM variance components" (double precision): Var(C) 0.02724923,
    # Var(T*C) 0.01197530, Var(R*C) 0.01226473; t = 2, r = 5
    assert close((ms["ms_c"] - ms["ms_tc"] - ms["ms_rc"] + ms["ms_trc"]) / 10, 0.02724923, 5e-9)
    assert close((ms["ms_tc"] - ms["ms_trc"]) / 5, 0.01197530, 5e-9)
    assert close((ms["ms_rc"] - ms["ms_trc"]) / 2, 0.01226473, 5e-9)
    out = res.to_dict()
    # JAFROC analysis 1: F 4.46, ddf 15.26, p 0.0517, CI (-0.08796, 0.00036); identical to ORH
    assert close(out["f"], 4.456319, 5e-6) and close(out["ddf"], 15.25967, 5e-5)
    assert close(out["p"], 0.0517)
    assert close(out["ci95"][0], -0.00036, 5e-6) and close(out["ci95"][1], 0.08796, 5e-6)
    # JAFROC analysis 2 (DBM FRRC): F(1, 113) = 5.48, p 0.0210, CI (-0.08088, -0.00672)
    frrc = res.tests["frrc"]
    assert frrc.ddf == 113 and close(frrc.p, 0.0210)
    assert close(frrc.comparisons[0].low, 0.00672, 5e-6)
    assert close(frrc.comparisons[0].high, 0.08088, 5e-6)
    # JAFROC analysis 3: F(1, 4) = 8.70, p 0.0420
    assert res.tests["rrfc"].ddf == 4 and close(res.tests["rrfc"].p, 0.0420)
    # JAFROC part (c), reader x case ANOVA per treatment: RRRC SE 0.03317359, DF 12.74, CI
    # (0.82522361, 0.96885046); FRRC SE 0.02428969, DF 113, CI (0.84891477, 0.94515930)
    est, se, df, low, high = res.main.modality_ci["1"]
    assert close(se, 0.03317359, 5e-8) and close(df, 12.74, 5e-3)
    assert close(low, 0.82522361, 5e-8) and close(high, 0.96885046, 5e-8)
    est, se, df, low, high = frrc.modality_ci["1"]
    assert close(se, 0.02428969, 5e-8) and df == 113
    assert close(low, 0.84891477, 5e-8) and close(high, 0.94515930, 5e-8)


# -- Franken (4 readers x 2 modalities x 100 cases; Cov2 < Cov3, so ddf = (t-1)(r-1)) --------

def test_franken_orh_rrrc(franken):
    res = mrmc.analyze(franken)
    out = res.to_dict()
    # RJAFROC ret$FOMs$foms
    assert np.allclose(res.aucs, [[0.8534600, 0.8649932, 0.8573044, 0.8152420],
                                  [0.8496156, 0.8435097, 0.8401176, 0.8143374]], atol=5e-8)
    assert close(out["fom"]["1"], 0.8477499, 5e-8)
    assert close(out["fom"]["2"], 0.8368951, 5e-8)
    assert close(out["difference"], -0.01085482, 5e-9)
    c = res.components  # RJAFROC ret$ANOVA$VarCom
    assert c["var"] == pytest.approx(1.525776e-03, rel=1e-6)
    assert c["cov1"] == pytest.approx(7.916821e-04, rel=1e-6)
    assert c["cov2"] == pytest.approx(4.836377e-04, rel=1e-6)
    assert c["cov3"] == pytest.approx(5.125091e-04, rel=1e-6)
    assert c["ms_tr"] == pytest.approx(5.020264e-05, rel=1e-6)
    # RJAFROC ret$RRRC$FTests / ciDiffTrt: F 4.694058, DF 3, p 0.1188379, SE 0.005010122,
    # CI (-0.005089627, 0.02679926) for 1 - 2
    assert close(out["f"], 4.694058, 5e-7)
    assert out["ddf"] == 3
    assert close(out["p"], 0.1188379, 5e-8)
    assert close(res.main.comparisons[0].se, 0.005010122, 5e-10)
    assert close(out["ci95"][0], -0.02679926, 5e-9)
    assert close(out["ci95"][1], 0.005089627, 5e-10)
    # RJAFROC ret$RRRC$ciAvgRdrEachTrt
    est, se, df, low, high = res.main.modality_ci["1"]
    assert close(se, 0.02440215, 5e-9) and close(df, 70.12179, 5e-6)
    assert close(low, 0.7990828, 5e-8) and close(high, 0.8964170, 5e-8)
    est, se, df, low, high = res.main.modality_ci["2"]
    assert close(se, 0.02356642, 5e-9) and close(df, 253.64403, 5e-5)
    assert close(low, 0.7904843, 5e-8) and close(high, 0.8833058, 5e-8)


def test_franken_dbm(franken):
    res = mrmc.analyze(franken, analysis="dbm")
    published = {"ms_t": 0.023565410, "ms_r": 0.068406000, "ms_c": 0.530589886,  # RJAFROC
                 "ms_tr": 0.005020264, "ms_tc": 0.064747968, "ms_rc": 0.132131158,
                 "ms_trc": 0.076296558}
    for key, value in published.items():
        assert close(res.components[key], value, 5e-9), key
    out = res.to_dict()
    assert close(out["f"], 4.694058, 5e-7) and out["ddf"] == 3
    assert close(out["p"], 0.1188379, 5e-8)


# -- FedRoc (4 readers x 5 modalities x 200 cases) -----------------------------------------

FEDROC_MEANS = {"1": 0.84516250, "2": 0.85026250, "3": 0.80983750, "4": 0.85057500,
                "5": 0.80838750}  # IOWA
# IOWA: (a, b, "TREATMENT AUC MEAN DIFFERENCES" a - b, then analysis 1 (b): p, CI low,
# CI high)
FEDROC_RRRC = [
    ("1", "2", -0.00510000, 0.7616, -0.04002, 0.02982),
    ("1", "3", 0.03532500, 0.0477, 0.00040, 0.07025),
    ("1", "4", -0.00541250, 0.7475, -0.04033, 0.02951),
    ("1", "5", 0.03677500, 0.0402, 0.00185, 0.07170),
    ("2", "3", 0.04042500, 0.0258, 0.00550, 0.07535),
    ("2", "4", -0.00031250, 0.9851, -0.03523, 0.03461),
    ("2", "5", 0.04187500, 0.0216, 0.00695, 0.07680),
    ("3", "4", -0.04073750, 0.0249, -0.07566, -0.00582),
    ("3", "5", 0.00145000, 0.9312, -0.03347, 0.03637),
    ("4", "5", 0.04218750, 0.0208, 0.00727, 0.07711),
]


def test_fedroc_orh_rrrc(fedroc):
    res = mrmc.analyze(fedroc)
    out = res.to_dict()
    for m, value in FEDROC_MEANS.items():
        assert close(out["fom"][m], value, 5e-9)
    c = res.components  # IOWA variance components
    for key, value in {"var": 0.00078912, "cov1": 0.00029480, "cov2": 0.00023331,
                       "cov3": 0.00021213, "var_r": 0.00128372, "var_tr": -0.00001093,
                       "ms_t": 0.00189696, "ms_r": 0.00729418, "ms_tr": 0.00046221}.items():
        assert close(c[key], value, 5e-9), key
    # IOWA: F(4, 16.80) = 3.47, p .0305; error term 0.00054695
    assert res.main.ndf == 4
    assert close(res.main.error_term, 0.00054695, 5e-9)
    assert close(out["f"], 0.00189696 / 0.00054695, 5e-4)
    assert close(out["ddf"], 16.80, 5e-3)
    assert close(out["p"], 0.0305)
    pairs = {(p["first"], p["second"]): p for p in out["pairs"]}
    assert len(pairs) == 10
    for a, b, diff, p, low, high in FEDROC_RRRC:
        got = pairs[(a, b)]  # ours is b - a
        assert close(got["difference"], -diff, 5e-9), (a, b)
        assert close(got["p"], p), (a, b)
        assert close(got["ci95"][0], -high, 5e-6) and close(got["ci95"][1], -low, 5e-6)
        assert close(got["se"], 0.01654, 5e-6)


def test_fedroc_frrc_rrfc_and_dbm(fedroc):
    res = mrmc.analyze(fedroc)
    # IOWA analysis 2: X2(4) = 13.60126, p .0087; SE 0.01670; analysis 3: F(4,12) 4.10, .0253
    assert close(res.tests["frrc"].f * 4, 13.60126, 5e-6)
    assert close(res.tests["frrc"].p, 0.0087)
    assert close(res.tests["frrc"].comparisons[0].se, 0.01670, 5e-6)
    assert res.tests["rrfc"].ddf == 12 and close(res.tests["rrfc"].p, 0.0253)
    assert close(res.tests["rrfc"].comparisons[0].se, 0.01520, 5e-6)
    dbm = mrmc.analyze(fedroc, analysis="dbm")
    published = {"ms_t": 0.37939129, "ms_r": 1.45883611, "ms_c": 1.04275840,  # JAFROC
                 "ms_tr": 0.09244135, "ms_tc": 0.11157500, "ms_rc": 0.17729946,
                 "ms_trc": 0.09462619}
    for key, value in published.items():
        assert dbm.components[key] == pytest.approx(value, rel=1e-5), key
    # JAFROC: RRRC F(4, 16.80) 3.47 p 0.0305; FRRC F(4, 796) = 3.40, p 0.0091
    assert close(dbm.main.p, 0.0305) and close(dbm.main.ddf, 16.80, 5e-3)
    assert dbm.tests["frrc"].ddf == 796 and close(dbm.tests["frrc"].p, 0.0091)
    assert close(dbm.tests["frrc"].f, 3.40, 5e-3)


def test_dbm_equals_orh_jackknife_for_random_readers_and_cases(fedroc, franken):
    # Hillis et al. 2008: with jackknife covariances and the Wilcoxon AUC the two coincide
    for study in (fedroc, franken):
        orh = mrmc.analyze(study).main
        dbm = mrmc.analyze(study, analysis="dbm").main
        assert dbm.f == pytest.approx(orh.f, rel=1e-9)
        assert dbm.ddf == pytest.approx(orh.ddf, rel=1e-9)


def test_delong_option_runs_and_is_close_to_jackknife(vandyke):
    jk = mrmc.analyze(vandyke)
    dl = mrmc.analyze(vandyke, method="delong")
    assert dl.method == "delong" and dl.to_dict()["method"] == "delong"
    # the jackknife covariance of the Wilcoxon AUC is DeLong's up to O(1/n) factors
    for key in ("var", "cov1", "cov2", "cov3"):
        assert dl.components[key] == pytest.approx(jk.components[key], rel=0.05), key
    assert dl.to_dict()["difference"] == jk.to_dict()["difference"]


# -- options and output --------------------------------------------------------------------

def test_reference_modality_flips_the_difference(vandyke, fedroc):
    out = mrmc.analyze(vandyke, reference="2").to_dict()
    assert list(out["fom"]) == ["2", "1"]
    assert close(out["difference"], -0.04380032, 5e-9)
    assert close(out["ci95"][0], -0.0879594986, 5e-10)
    out = mrmc.analyze(fedroc, reference="3").to_dict()
    assert [(p["first"], p["second"]) for p in out["pairs"][:4]] == [
        ("3", "1"), ("3", "2"), ("3", "4"), ("3", "5")]
    with pytest.raises(mrmc.ReaderStudyError, match="not in the study"):
        mrmc.analyze(vandyke, reference="9")


def test_json_keys(vandyke, fedroc):
    two = json.loads(mrmc.to_json(mrmc.analyze(vandyke)))
    assert set(two) == {"fom", "difference", "ci95", "f", "ddf", "p", "readers", "method",
                        "analysis"}
    assert two["readers"]["5"] == pytest.approx({"1": 0.82979066, "2": 0.92995169}, abs=5e-9)
    five = json.loads(mrmc.to_json(mrmc.analyze(fedroc, analysis="dbm")))
    assert set(five) == set(two) | {"pairs"} and five["analysis"] == "dbm"
    frrc = json.loads(mrmc.to_json(mrmc.analyze(vandyke, design="frrc")))
    assert frrc["ddf"] is None and frrc["design"] == "frrc"  # infinite ddf -> null


def test_cli_json_table_and_html(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["reader-study", "analyze", str(VANDYKE), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert close(out["p"], 0.05166569, 5e-9) and out["analysis"] == "orh"
    html_path = tmp_path / "report.html"
    res = runner.invoke(main, ["reader-study", "analyze", str(FEDROC), "--html",
                               str(html_path), "--analysis", "dbm"])
    assert res.exit_code == 0, res.output
    assert "RRRC" in res.output and "F(4, 16.80) = 3.4682" in res.output
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "<table id='readers'>" in page
    res = runner.invoke(main, ["reader-study", "analyze", str(FRANKEN), "--method", "delong",
                               "--reference", "2", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["method"] == "delong"


# -- bad input: one clear error, exit code 2, no traceback ---------------------------------

def _write(path, rows, fields=("reader", "modality", "case", "truth", "rating")):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


def _good_rows():
    return [[r, m, c, int(c > 2), (c + r + m) % 5] for r in (1, 2) for m in (1, 2)
            for c in (1, 2, 3, 4)]


BAD = {
    "not_crossed": (lambda rows: rows[:-1], "not fully crossed"),
    "missing_rating": (lambda rows: rows[:3] + [[*rows[3][:4], ""]] + rows[4:],
                       "missing rating"),
    "non_numeric": (lambda rows: rows[:3] + [[*rows[3][:4], "high"]] + rows[4:],
                    "not a number"),
    "nan_rating": (lambda rows: rows[:3] + [[*rows[3][:4], "nan"]] + rows[4:],
                   "not a finite number"),
    "one_modality": (lambda rows: [r for r in rows if r[1] == 1], "only one modality"),
    "truth_differs": (lambda rows: rows[:1] + [[*rows[1][:3], 1, rows[1][4]]] + rows[2:],
                      "has truth"),
    "truth_not_binary": (lambda rows: [[*r[:3], 2 if r[3] else 0, r[4]] for r in rows],
                         "truth must be 0 or 1"),
    "duplicate": (lambda rows: rows + rows[:1], "a second rating"),
    "one_class": (lambda rows: [[*r[:3], 0, r[4]] for r in rows], "at least two of each"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows(tmp_path, case):
    change, message = BAD[case]
    path = _write(tmp_path / "r.csv", change(_good_rows()))
    with pytest.raises(mrmc.ReaderStudyError, match=message):
        mrmc.read_ratings(path)
    _cli_fails(path, message)


@pytest.mark.parametrize(("fields", "message"), [
    (("reader", "modality", "case", "truth", "rating", "site"), "unknown column"),
    (("reader", "modality", "case", "rating"), "missing column"),
    (("reader", "treatment", "case", "truth", "rating"), "missing column.*modality"),
])
def test_bad_columns(tmp_path, fields, message):
    path = tmp_path / "r.csv"
    path.write_text(",".join(fields) + "\n" + ",".join("1" for _ in fields) + "\n")
    with pytest.raises(mrmc.ReaderStudyError, match=message):
        mrmc.read_ratings(path)
    _cli_fails(path, message)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty file"), ("\n \n", "empty file"),
    ("reader,modality,case,truth,rating\n", "header only"),
])
def test_empty_files(tmp_path, text, message):
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(mrmc.ReaderStudyError, match=message):
        mrmc.read_ratings(path)
    _cli_fails(path, message)


def test_other_errors_are_radguard_errors(tmp_path):
    assert issubclass(mrmc.ReaderStudyError, RadguardError)
    _cli_fails(tmp_path / "absent.csv", "no such file")
    study = mrmc.read_ratings(_write(tmp_path / "ok.csv", _good_rows()))
    with pytest.raises(mrmc.ReaderStudyError, match="jackknife"):
        mrmc.analyze(study, analysis="dbm", method="delong")
    one_reader = _write(tmp_path / "one.csv", [r for r in _good_rows() if r[0] == 1])
    _cli_fails(one_reader, "only one reader")


def _cli_fails(path, message):
    res = CliRunner().invoke(main, ["reader-study", "analyze", str(path)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.output.startswith("radguard: error: ")
    assert len(res.output.strip().splitlines()) == 1
    assert re.search(message, res.output), res.output
