"""The synthetic detector's boosted trees: the numpy evaluator agrees with scikit-learn on
the exported model, and broken tree arrays are refused with a clear error."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from radguard.errors import RadguardError
from radguard.forensics.synthetic import WEIGHTS_PATH, SyntheticDetector, _Trees
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_exported_trees_match_scikit_learn():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from train_synthetic_detector import export_trees

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    y = (x[:, 0] + np.sin(3 * x[:, 1]) * x[:, 2] + rng.normal(0, 0.3, 600) > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=9).fit(x, y)
    trees = _Trees(json.loads(json.dumps(export_trees(model))))  # through JSON, as shipped
    probe = rng.normal(size=(300, 12))
    assert np.allclose(trees.raw(probe), model.decision_function(probe), atol=1e-5)


def test_shipped_weights_have_trees_and_broken_trees_are_refused():
    weights = json.loads(WEIGHTS_PATH.read_text())
    assert weights["image"]["trees"]["roots"]
    broken = json.loads(WEIGHTS_PATH.read_text())
    broken["image"]["trees"]["left"] = broken["image"]["trees"]["left"][:-1]
    with pytest.raises(RadguardError, match="malformed"):
        SyntheticDetector(broken)
    broken = json.loads(WEIGHTS_PATH.read_text())
    broken["image"]["trees"]["left"][0] = 10**9
    with pytest.raises(RadguardError, match="malformed"):
        SyntheticDetector(broken)


def _tiny_weights(physics: bool) -> dict:
    """Hand-made weights of the shipped shape: a block model and one linear 'perceptron'."""
    from radguard.forensics.cues import BLOCK_CUES, CUE_NAMES, PHYSICS_CUE_NAMES

    d = len(CUE_NAMES) + 75 + 3 + (len(PHYSICS_CUE_NAMES) if physics else 0)
    names = [*CUE_NAMES, *(PHYSICS_CUE_NAMES if physics else ())]
    return {
        "block": {"mean": [0.0] * len(BLOCK_CUES), "scale": [1.0] * len(BLOCK_CUES),
                  "coef": [0.1] * len(BLOCK_CUES), "intercept": 0.0},
        "image": {"physics": physics, "mean": [0.0] * d, "scale": [1.0] * d,
                  "nets": [[{"W": [[0.01]] * d, "b": [0.0]}]]},
        "real_quantiles": {n: np.linspace(-1, 1, 101).tolist() for n in names},
        "threshold": 0.9, "suspicious_threshold": 0.8,
    }


@pytest.mark.parametrize("physics", [False, True])
def test_weights_with_and_without_physics_cues_score_an_image(physics):
    """Earlier weights (no physics cues) still load and score; weights trained with them
    take the six physics cues as inputs and report them as named cues."""
    from radguard.forensics.cues import PHYSICS_CUE_NAMES

    det = SyntheticDetector(_tiny_weights(physics))
    img = np.random.default_rng(0).integers(0, 255, (96, 128)).astype(np.uint8)
    result = det.analyse(img)
    assert np.isfinite(result.synthetic_score)
    named = {c.name for c in result.cues}
    assert bool(named & set(PHYSICS_CUE_NAMES)) == physics
    assert result.heatmap.shape == (3, 4)


def test_shipped_operating_point_is_ordered_and_says_how_it_was_chosen():
    """'suspicious' starts at or below 'synthetic', both inside (0, 1), and the weights say
    which held-out procedure chose them."""
    det = SyntheticDetector(json.loads(WEIGHTS_PATH.read_text()))
    assert 0.0 < det.suspicious_threshold <= det.threshold < 1.0
    assert "held-out" in det.info.get("operating_point", "")


def test_operating_point_never_uses_the_source_it_judges():
    """The LOSO threshold for one source comes from the other sources' held-out scores only:
    a source with wild scores moves every other source's threshold but not its own."""
    import synthdata as sd
    from train_synthetic_detector import operating_point

    class _T:  # the two columns operating_point reads
        pass

    t = _T()
    srcs = np.repeat(np.array(sd.REAL_SOURCES), 200)
    t.source, t.label = srcs, np.zeros(len(srcs), int)
    held = np.tile(np.linspace(0, 0.5, 200), len(sd.REAL_SOURCES))
    held[srcs == "cxr-wild"] = np.linspace(0.5, 1.0, 200)
    own, _ = operating_point(t, held, exclude="cxr-wild")
    other, _ = operating_point(t, held, exclude="cxr-nih")
    assert own < 0.5 < other


def test_outside_fakes_meet_reals_delivered_the_same_way():
    """A 128 px GAN's fakes are judged against its population's reals brought to small
    squares (never the untouched 512 px originals: the size would tell them apart), and only
    against test-split reals; StyleGAN2 crops against the run's own real crops."""
    import synthdata as sd
    from train_synthetic_detector import family_rows

    class _T:  # the columns family_rows reads
        pass

    t = _T()
    rows = [("PGGAN-150k", "PGGAN-150k", "none", "train"),
            ("real", "cxr-kermany", "none", "test"),
            ("real", "cxr-kermany", "deliver128", "test"),
            ("real", "cxr-kermany", "small", "test"),
            ("real", "cxr-kermany", "deliver128", "train"),
            ("real", "cxr-nih", "deliver128", "test"),
            ("StyleGAN2", "StyleGAN2", "chain1", "val"),
            ("real", "stylegan2-real", "chain1", "test")]
    t.family, t.source, t.variant, t.split = (np.array(c) for c in zip(*rows, strict=True))
    t.label = (t.family != "real").astype(int)
    t.image = np.array([f"img{i}" for i in range(len(rows))])
    fakes, reals = family_rows(t, "PGGAN-150k")
    assert fakes.tolist() == [True] + [False] * 7
    assert np.flatnonzero(reals).tolist() == [2, 3]
    assert sd.GENERATOR_REALS["StyleGAN2"][0] == "stylegan2-real"
    fakes, reals = family_rows(t, "StyleGAN2")
    assert np.flatnonzero(fakes).tolist() == [6] and np.flatnonzero(reals).tolist() == [7]
