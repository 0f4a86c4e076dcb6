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
