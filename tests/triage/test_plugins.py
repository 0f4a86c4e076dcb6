"""Hospitals' own models: an ONNX bundle run by onnxruntime, and a model that an installed
package registers through the ``radguard.triage_models`` entry point."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.triage.model import (
    OnnxTriageModel,
    TriageError,
    load_bundle,
    load_model,
    runtime_export_path,
    write_runtime_export,
)
from radguard.triage.training import write_bundle
from tests.conftest import NIH_DX, SHARED


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _nih_images(n):
    folder = SHARED / "cxr-nih" / "images"
    return [np.asarray(Image.open(p).convert("L")) for p in sorted(folder.iterdir())[:n]]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "chest-onnx"
    result = run("triage", "export-onnx", "--model", "chest", "-o", out)
    assert result.exit_code == 0, result.output
    return out.with_name("chest-onnx.json")


def _torch_only(model):
    """The same bundle with its scores computed by torch (the shipped one runs onnxruntime)."""
    model = copy.copy(model)
    model.session = None
    return model


def _assert_same_scores(model, reference):
    """Raw scores, probabilities and suspicion of six NIH radiographs agree (to 1e-4)."""
    images = _nih_images(6)
    batch = np.stack([reference.preprocess(i) for i in images])
    assert np.abs(model.raw_scores(batch) - reference.raw_scores(batch)).max() < 1e-4
    for image in images:
        a, b = reference.predict(image), model.predict(image)
        assert abs(a.probability - b.probability) < 1e-4 and a.suspicion == b.suspicion


def test_onnx_bundle_scores_like_the_torch_model(onnx_bundle):
    torch_model, onnx_model = _torch_only(load_model("chest")), load_model(str(onnx_bundle))
    assert torch_model.runtime == "torch"
    assert isinstance(onnx_model, OnnxTriageModel)
    assert json.loads(onnx_bundle.read_text())["format"] == "onnx"
    assert onnx_model.card == torch_model.card and onnx_model.threshold == torch_model.threshold
    _assert_same_scores(onnx_model, torch_model)


def test_onnx_model_through_the_cli_with_dicom_results(onnx_bundle, tmp_path):
    result = run("triage", "predict", "--model", onnx_bundle, "--json", "--sr-dir", tmp_path,
                 NIH_DX)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["model"] == "chest" and 0.0 <= record["probability"] <= 1.0
    assert any(p.suffix == ".dcm" for p in tmp_path.iterdir())


def test_onnx_saliency_by_occlusion_points_at_what_changes_the_score(onnx_bundle):
    model = load_model(str(onnx_bundle))
    image = _nih_images(1)[0]
    heat = model.saliency(image)
    assert heat.shape == image.shape and heat.min() >= 0.0 and heat.max() <= 1.0
    # blanking the block the map rates highest lowers the logit by more than blanking the
    # block it rates lowest
    x = model.preprocess(image)
    grid = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((8, 8)))
    (hy, hx), (ly, lx) = (np.unravel_index(f(grid), grid.shape) for f in (np.argmax, np.argmin))

    def blanked(r, c):
        y = x.copy()
        y[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 0.0
        return y

    base = model.raw_scores(x[None])[0]
    drops = base - model.raw_scores(np.stack([blanked(hy, hx), blanked(ly, lx)]))
    assert drops[0] > drops[1]


def test_broken_onnx_bundles_get_clear_errors(onnx_bundle, tmp_path):
    meta = json.loads(onnx_bundle.read_text())
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(meta))
    with pytest.raises(TriageError, match="missing.onnx not found"):
        load_model(str(missing))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(json.dumps(meta))
    (tmp_path / "corrupt.onnx").write_bytes(b"not a protobuf" * 10)
    with pytest.raises(TriageError, match="not a loadable ONNX model"):
        load_model(str(corrupt))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**meta, "format": "tensorflow"}))
    with pytest.raises(TriageError, match="unknown model format 'tensorflow'"):
        load_model(str(unknown))
    result = run("triage", "predict", "--model", corrupt, NIH_DX)
    assert result.exit_code == 2 and "not a loadable ONNX model" in result.output


def test_an_onnx_model_with_the_wrong_output_is_refused_per_image(onnx_bundle, tmp_path):
    """A model returning two numbers per image is caught, not silently half-read."""
    import torch

    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(1, 2)).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 128, 128),), str(tmp_path / "two.onnx"),
                      input_names=["image"], dynamo=False,
                      dynamic_axes={"image": {0: "n"}})
    (tmp_path / "two.json").write_text(onnx_bundle.read_text())
    model = load_model(str(tmp_path / "two.json"))
    with pytest.raises(TriageError, match="one logit per image expected"):
        model.predict(_nih_images(1)[0])


def test_patch_models_do_not_export(tmp_path):
    result = run("triage", "export-onnx", "--model", "mammo", "-o", tmp_path / "m")
    assert result.exit_code == 2 and "only whole-image models" in result.output
    assert not list(tmp_path.iterdir())


def test_an_installed_package_registers_its_model_by_entry_point(onnx_bundle, tmp_path):
    """The way a hospital ships its model: a package whose entry point returns a
    TriageModel; `radguard triage predict --model NAME` then finds it by name."""
    site = tmp_path / "site"
    (site / "hospital_model").mkdir(parents=True)
    (site / "hospital_model" / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from radguard.triage.model import load_bundle

        def load():
            return load_bundle(Path({str(onnx_bundle)!r}))

        def broken():
            return "not a model"
    """))
    info = site / "hospital_model-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hospital-model\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[radguard.triage_models]\n"
                                           "st-marys-chest = hospital_model:load\n"
                                           "broken = hospital_model:broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site),
                                                        os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "radguard.cli", "triage", "predict", "--json", str(NIH_DX)]
    done = subprocess.run([*cli, "--model", "st-marys-chest"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "chest"
    bad = subprocess.run([*cli, "--model", "broken"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "returned str, not a TriageModel" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_shipped_chest_bundle_scores_on_its_stamped_export_like_torch():
    """chest.pt.onnx runs the scores (the gateway scores every chest radiograph); it must
    give what the weights give in torch."""
    model = load_model("chest")
    assert model.runtime == "onnxruntime"
    _assert_same_scores(model, _torch_only(model))


def test_a_stale_runtime_export_is_refused_and_new_weights_drop_it(tmp_path):
    import torch

    data = Path(__file__).resolve().parents[2] / "radguard" / "triage" / "data"
    for name in ("chest.json", "chest.pt", "chest.pt.onnx"):
        shutil.copy(data / name, tmp_path / name)
    bundle = tmp_path / "chest.json"
    assert load_bundle(bundle).runtime == "onnxruntime"
    state = torch.load(tmp_path / "chest.pt")
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[name] = state[name] * 1.5  # other weights than the export was made from
    torch.save(state, tmp_path / "chest.pt")
    with pytest.raises(TriageError, match="was not exported from"):
        load_bundle(bundle)
    write_runtime_export(bundle)  # exported again from the new weights
    fresh = load_bundle(bundle)
    image = _nih_images(1)[0]
    assert fresh.runtime == "onnxruntime"
    assert abs(fresh.predict(image).probability
               - _torch_only(fresh).predict(image).probability) < 1e-4
    write_bundle(tmp_path / "chest", fresh.network, fresh.meta)  # retrained weights
    assert not runtime_export_path(bundle).exists() and load_bundle(bundle).runtime == "torch"
