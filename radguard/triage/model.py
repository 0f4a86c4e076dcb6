"""The plug-in contract every triage model follows, and the registry that finds them.

A model is a :class:`TriageModel`: it checks that an image is in its scope (refusing a CT
slice given to a chest X-ray model rather than scoring it silently), preprocesses it, and
returns a raw score, a calibrated probability and a 1-10 suspicion. Hospitals register their
own with :func:`register_model`; radguard's reference models are registered by name.

A PyTorch model ships as a *bundle*: ``<name>.pt`` (state dict) beside ``<name>.json``
(model card, input size, calibrator, suspicion scale, operating point), loaded by
:class:`TorchTriageModel`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.triage.scores import Calibrator, SuspicionScale, TriageError

__all__ = ["BundleTriageModel", "ModelCard", "OnnxTriageModel", "OutOfScope",
           "PatchTriageModel", "Prediction", "RegionTriageModel", "TorchTriageModel",
           "TriageModel", "available_models", "bundle_stem", "card_text", "load_bundle",
           "load_model", "register_model"]


class OutOfScope(TriageError):
    """The image is not something this model was built to read."""


@dataclass
class ModelCard:
    """What a model is for and how it was made (shown with every prediction)."""

    name: str
    version: str
    intended_use: str
    training_data: str
    modalities: list[str] = field(default_factory=list)
    metrics: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def card_text(card: dict[str, Any], width: int = 100) -> str:
    """A model card (:meth:`ModelCard.to_dict`, plus ``operating_threshold``) as text for
    people: what it is for, what it learnt from, what was measured (AUCs with their CIs,
    per source or subgroup where the card has them), its operating point and limitations."""
    import textwrap

    info = dict(card)
    lines = [f"{info.pop('name', '?')} {info.pop('version', '')}".rstrip(), ""]

    def field_(label: str, value: object, indent: int = 0) -> None:
        text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        lines.extend(textwrap.wrap(text, width, initial_indent=" " * indent +
                                   f"{label + ':':<17} ", subsequent_indent=" " * (indent + 18))
                     or [" " * indent + label + ":"])

    for key, label in (("intended_use", "intended use"), ("modalities", "modalities"),
                       ("training_data", "training data")):
        if key in info:
            field_(label, info.pop(key))
    metrics = dict(info.pop("metrics", None) or {})
    threshold = info.pop("operating_threshold", None)
    point = metrics.pop("operating_point", None)
    measured_by = metrics.pop("measured_by", None)
    limits: list[str] = []
    limits += [str(v) for v in _as_list(info.pop("limitations", None))]
    if metrics:
        lines += ["", "measured" + (f" (by {measured_by})" if measured_by else "") + ":"]
        _metric_lines(metrics, lines, limits, "", 2)
    if isinstance(point, dict) or threshold is not None:
        lines.append("")
        if isinstance(point, dict):
            parts = [f"{k} {_num(point[k])}" for k in ("sensitivity", "specificity")
                     if point.get(k) is not None]
            if point.get("expected_cost") is not None:
                parts.append(f"expected cost {_num(point['expected_cost'])} per study")
            method = f" (chosen for {point['method']})" if point.get("method") else ""
            field_("operating point", f"threshold {_num(point.get('threshold'))}{method}: "
                   + ", ".join(parts))
            if threshold is not None and point.get("threshold") is not None and \
                    abs(float(threshold) - float(point["threshold"])) > 1e-12:
                field_("threshold in use", _num(threshold))
        else:
            field_("threshold in use", _num(threshold))
    for key, value in info.items():  # anything else a plug-in's card carries
        field_(key.replace("_", " "), json.dumps(value) if isinstance(value, dict) else value)
    if limits:
        lines += ["", "limitations:"]
        for text in limits:
            lines.extend(textwrap.wrap(text, width, initial_indent="  - ",
                                       subsequent_indent="    "))
    return "\n".join(x for i, x in enumerate(lines) if x or (i and lines[i - 1]))


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _num(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _metric_name(key: str) -> str:
    return " ".join("AUC" if w.lower() == "auc" else w for w in str(key).split("_"))


def _metric_lines(metrics: dict[str, Any], lines: list[str], limits: list[str], where: str,
                  indent: int) -> None:
    """One line per measured figure; nested dicts (per source, per subgroup) indented."""
    pad = " " * indent
    for key, value in metrics.items():
        name = _metric_name(key)
        if isinstance(value, dict) and "auc" in value:
            ci = (f" (95% CI {_num(value['low'])}-{_num(value['high'])})"
                  if "low" in value and "high" in value else "")
            counts = (f"; {value['positives']} positive, {value['negatives']} negative"
                      if "positives" in value and "negatives" in value else "")
            what = "" if "AUC" in name else "AUC "
            lines.append(f"{pad + name + ':':<35} {what}{_num(value['auc'])}{ci}{counts}")
            low = value.get("low")
            if isinstance(low, int | float) and low <= 0.5:
                limits.append(f"{(where + ' ' + name).strip()}: the AUC's 95% CI reaches 0.5 "
                              "- no better than chance shown there")
        elif isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            _metric_lines(value, lines, limits, f"{where} {name}".strip(), indent + 2)
        else:
            lines.append(f"{pad + name + ':':<35} {_num(value)}")


@dataclass
class Prediction:
    """One image's triage result."""

    path: str
    score: float
    probability: float
    suspicion: int
    positive: bool  # at or above the model's operating point
    model: str
    version: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form with the documented keys path, probability, suspicion, model,
        version."""
        return {"path": self.path, "probability": round(self.probability, 4),
                "suspicion": self.suspicion, "positive": self.positive,
                "score": round(self.score, 4), "model": self.model, "version": self.version}


class TriageModel(ABC):
    """Base class: subclasses implement :meth:`check_scope`, :meth:`preprocess` and
    :meth:`raw_scores`; calibration, suspicion and the operating point come from fitted
    :class:`Calibrator` / :class:`SuspicionScale` objects."""

    def __init__(self, card: ModelCard, calibrator: Calibrator, scale: SuspicionScale,
                 threshold: float) -> None:
        self.card, self.calibrator, self.scale, self.threshold = card, calibrator, scale, threshold

    @abstractmethod
    def check_scope(self, pixels: np.ndarray, modality: str | None) -> None:
        """Raise :class:`OutOfScope` for images the model must not score."""

    @abstractmethod
    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """One image as the network's input array."""

    @abstractmethod
    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        """Uncalibrated scores (logits) for a stack of preprocessed images."""

    def saliency(self, pixels: np.ndarray) -> np.ndarray:
        """Where the evidence lies: a map in [0, 1] of the image's shape. Optional."""
        raise TriageError(f"model {self.card.name} provides no saliency maps")

    def predict(self, pixels: np.ndarray, *, modality: str | None = None, path: str = ""
                ) -> Prediction:
        """Scope check, preprocessing, score, calibration, suspicion, operating point."""
        self.check_scope(pixels, modality)
        score = float(self.raw_scores(self.preprocess(pixels)[None])[0])
        probability = float(self.calibrator.predict(np.array([score]))[0])
        return Prediction(path, score, probability, int(self.scale.score(probability)),
                          probability >= self.threshold, self.card.name, self.card.version)


_REGISTRY: dict[str, Callable[[], TriageModel]] = {}


def register_model(name: str, loader: Callable[[], TriageModel]) -> None:
    """Make a model available to ``radguard triage predict --model NAME``."""
    _REGISTRY[name] = loader


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def load_model(name: str) -> TriageModel:
    """A registered model by name (radguard's own, those registered in Python, and those
    installed packages declare under the ``radguard.triage_models`` entry point), or a
    bundle by the path of its JSON file."""
    if name not in _REGISTRY:
        _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name.endswith(".json"):
        return load_bundle(Path(name))
    raise TriageError(f"unknown model '{name}' (available: {', '.join(available_models())}, "
                      "or the path of a bundle's .json file)")


def _load_entry_points() -> None:
    """Models of installed plug-in packages: ``[project.entry-points."radguard.triage_models"]
    name = "package.module:loader"`` where ``loader()`` returns a TriageModel."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="radguard.triage_models"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = lambda ep=ep: _checked(ep.name, ep.load()())

def _checked(name: str, model: object) -> TriageModel:
    if not isinstance(model, TriageModel):
        raise TriageError(f"plug-in '{name}' returned {type(model).__name__}, not a "
                          "TriageModel")
    return model


def bundle_stem(out: str | Path) -> Path:
    """A bundle's path without its .json / .pt / .onnx suffix (other dots are part of the
    name): ``OUT`` in ``OUT.json`` + ``OUT.pt``."""
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".json", ".pt", ".onnx") else out


def load_bundle(json_path: Path) -> TriageModel:
    """A model bundle: ``<name>.json`` (card, input size, calibrator, suspicion scale,
    operating point, and ``format``: ``torch`` (default, weights in ``<name>.pt``) or
    ``onnx`` (``<name>.onnx``, run by onnxruntime, no torch needed))."""
    from radguard.fileio import read_json_object

    meta = read_json_object(json_path, "model bundle", TriageError)
    fmt = meta.get("format", "torch")
    if fmt == "onnx":
        return OnnxTriageModel.from_bundle(json_path, meta)
    if fmt != "torch":
        raise TriageError(f"{json_path}: unknown model format '{fmt}' (torch or onnx)")
    return TorchTriageModel.from_bundle(json_path, meta)


def grey_2d(pixels: np.ndarray) -> np.ndarray:
    """A 2D grey image (integer arrays as they are, anything else as float32), or
    OutOfScope for colour photos and malformed arrays."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float64)
        if np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean() > 2.0:
            raise OutOfScope("a colour image, not a radiograph")
        a = rgb.mean(axis=-1)
    if a.ndim != 2 or a.dtype.kind not in "uifb":
        raise OutOfScope(f"expected a 2D grey image, got shape {a.shape}")
    if a.dtype.kind in "ui":
        return a  # integers stay integers (cheaper statistics downstream)
    if not np.isfinite(a).all():
        raise OutOfScope("image holds NaN or infinite values")
    return a.astype(np.float32)


class BundleTriageModel(TriageModel):
    """What every bundle shares: the card and scores from its JSON, the scope check (listed
    modalities, grey, a minimum size) and the input convention of
    :func:`radguard.triage.networks.to_input`. Subclasses run the network (:meth:`run`)."""

    def __init__(self, meta: dict, network: object) -> None:
        try:
            card = ModelCard(**meta["card"])
            super().__init__(card, Calibrator.from_dict(meta["calibrator"]),
                             SuspicionScale.from_dict(meta["suspicion"]),
                             float(meta["threshold"]))
            self.size = int(meta["input_size"])
            self.min_side = int(meta.get("min_side", 64))
        except (KeyError, TypeError, ValueError) as exc:
            raise TriageError(f"malformed model bundle ({exc})") from exc
        self.network = network
        self.meta = meta

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """The network's output for a float32 batch (n, 1, h, w), flattened to n logits."""

    def check_scope(self, pixels: np.ndarray, modality: str | None) -> None:
        allowed = self.card.modalities
        if modality is not None and allowed and modality.upper() not in allowed:
            raise OutOfScope(f"{self.card.name} reads {'/'.join(allowed)}, not {modality}")
        a = grey_2d(pixels)
        if min(a.shape) < self.min_side:
            raise OutOfScope(f"image {a.shape[1]}x{a.shape[0]} is too small "
                             f"(at least {self.min_side} px per side)")

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        from radguard.triage.networks import to_input

        return to_input(grey_2d(pixels), self.size)

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(batch, np.float32)).astype(np.float64)

    def occlusion_saliency(self, pixels: np.ndarray, *, block: int = 16) -> np.ndarray:
        """Model-agnostic saliency: how much the logit falls when each block of the input is
        replaced by the image mean (0), scaled to [0, 1] and resized to the image. Needs
        only forward passes, so it works for any runtime (ONNX included)."""
        from PIL import Image

        grey = grey_2d(pixels)
        x = self.preprocess(grey)
        base = float(self.run(x[None])[0])
        n = self.size // block
        batch = np.repeat(x[None], n * n, axis=0)
        for k in range(n * n):
            r, c = divmod(k, n)
            batch[k, :, r * block:(r + 1) * block, c * block:(c + 1) * block] = 0.0
        drop = np.clip(base - self.run(batch), 0.0, None).reshape(n, n).astype(np.float32)
        if drop.max() > 0:
            drop /= drop.max()
        heat = Image.fromarray(drop, mode="F").resize((grey.shape[1], grey.shape[0]),
                                                      Image.Resampling.BILINEAR)
        return np.clip(np.asarray(heat), 0.0, 1.0)


class TorchTriageModel(BundleTriageModel):
    """A PyTorch network from a bundle (``.json`` metadata + ``.pt`` state dict)."""

    @classmethod
    def from_bundle(cls, json_path: Path, meta: dict) -> TorchTriageModel:
        """The weights beside ``json_path`` in the network ``meta`` describes (use
        :func:`load_bundle`, which reads the JSON and picks the runtime)."""
        import torch

        from radguard.triage.networks import build_network

        try:
            state = torch.load(json_path.with_suffix(".pt"), map_location="cpu")
        except FileNotFoundError as exc:
            raise TriageError(f"model bundle incomplete: {exc.filename} not found") from exc
        except (OSError, ValueError, RuntimeError, EOFError) as exc:
            raise TriageError(f"{json_path}: unreadable model weights ({exc})") from exc
        try:
            net = build_network(meta.get("network", {}))
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
            raise TriageError(f"{json_path}: weights do not fit the network ({exc})") from exc
        net.eval()
        kind = meta.get("kind", "image")
        if kind == "patch":
            return PatchTriageModel(meta, net)
        if kind == "region":
            return RegionTriageModel(meta, net, base=json_path.parent)
        if kind != "image":
            raise TriageError(f"{json_path}: unknown model kind '{kind}'")
        model = cls(meta, net)
        from radguard.onnxrt import open_stamped_export

        try:
            model.session = open_stamped_export(
                json_path.with_suffix(".pt"), runtime_export_path(json_path),
                threads=torch.get_num_threads(), remedy="retrain, or call write_runtime_export")
        except RadguardError as exc:
            raise TriageError(str(exc)) from exc
        return model

    #: onnxruntime session of the weights' stamped export (``<name>.pt.onnx``), when the
    #: bundle ships one: scores run there (half torch's time on one core); saliency and
    #: embeddings need torch's gradients and layers
    session: Any = None

    @property
    def runtime(self) -> str:
        """Which runtime computes the scores: ``onnxruntime`` or ``torch``."""
        return "onnxruntime" if self.session is not None else "torch"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self.session is not None:
            out = self.session.run(None, {"image": np.ascontiguousarray(batch, np.float32)})
            return np.asarray(out[0]).reshape(len(batch))
        with torch.no_grad():
            out = self.network(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return out.reshape(len(batch)).numpy()

    def saliency(self, pixels: np.ndarray) -> np.ndarray:
        """Grad-CAM (MONAI) on the bundle's saliency layer (default: the penultimate residual
        unit, 16 x 16 at 128 px), resized to the image."""
        import torch
        from monai.visualize import GradCAM
        from PIL import Image

        grey = grey_2d(pixels)
        layer = str(self.meta.get("saliency_layer", "net.layer_2"))
        x = torch.from_numpy(self.preprocess(grey)[None])
        cam = GradCAM(nn_module=self.network, target_layers=layer)(x=x)[0, 0].numpy()
        heat = Image.fromarray(cam.astype(np.float32), mode="F")
        heat = heat.resize((grey.shape[1], grey.shape[0]), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(heat), 0.0, 1.0)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """The network's last feature maps, averaged over space: one vector per image of a
        preprocessed batch (what drift tests and dataset audits compare images by)."""
        import torch

        body = getattr(self.network, "net", None)
        if body is None:
            raise TriageError(f"{self.card.name}: this network exposes no feature layer")
        with torch.no_grad():
            maps = body(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return maps.mean(dim=(2, 3)).numpy().astype(np.float64)

    def export_onnx(self, out: str | Path) -> Path:
        """This model as an ONNX bundle (``<out>.onnx`` + ``<out>.json``, same card and
        scores) that runs with onnxruntime alone; returns the JSON path."""
        import torch

        from radguard.fileio import atomic_write_bytes
        from radguard.onnxrt import export_onnx

        if type(self) is not TorchTriageModel:
            raise TriageError(f"{self.card.name}: only whole-image models export to ONNX")
        out = bundle_stem(out)
        try:
            data = export_onnx(self.network, torch.zeros(1, 1, self.size, self.size),
                               input_name="image", output_name="logit",
                               dynamic_axes={"image": {0: "n"}, "logit": {0: "n"}})
        except RadguardError as exc:
            raise TriageError(str(exc)) from exc
        atomic_write_bytes(out.with_name(out.name + ".onnx"), data, durable=False)
        meta = {k: v for k, v in self.meta.items() if k not in ("network", "saliency_layer")}
        json_path = out.with_name(out.name + ".json")
        atomic_write_bytes(json_path, json.dumps({**meta, "format": "onnx"}, indent=1).encode(),
                           durable=False)
        return json_path


def runtime_export_path(json_path: Path) -> Path:
    """Where a PyTorch bundle's stamped ONNX export lives: ``<name>.pt.onnx``."""
    return Path(json_path).with_suffix(".pt.onnx")


def write_runtime_export(json_path: str | Path) -> Path:
    """Write the stamped ONNX export of a whole-image PyTorch bundle beside its weights
    (``<name>.pt.onnx``): what :func:`load_bundle` runs the scores with. Needs ``onnx``."""
    import torch

    from radguard.onnxrt import write_stamped_export

    json_path = Path(json_path)
    runtime_export_path(json_path).unlink(missing_ok=True)  # made again from the weights
    model = load_bundle(json_path)
    if type(model) is not TorchTriageModel:
        raise TriageError(f"{json_path}: only whole-image PyTorch bundles have a runtime "
                          "export")
    try:
        return write_stamped_export(
            model.network, torch.zeros(1, 1, model.size, model.size),
            json_path.with_suffix(".pt"), runtime_export_path(json_path), input_name="image",
            output_name="logit", dynamic_axes={"image": {0: "n"}, "logit": {0: "n"}})
    except RadguardError as exc:
        raise TriageError(str(exc)) from exc


class OnnxTriageModel(BundleTriageModel):
    """An ONNX network (``<name>.onnx`` beside ``<name>.json``) run by onnxruntime on CPU:
    a hospital's own model, exported from any framework, with input (n, 1, size, size) as
    :func:`radguard.triage.networks.to_input` makes it and one logit per image. Saliency is
    by occlusion, since the runtime gives no gradients."""

    @classmethod
    def from_bundle(cls, json_path: Path, meta: dict) -> OnnxTriageModel:
        from radguard.onnxrt import open_session

        weights = json_path.with_suffix(".onnx")
        if not weights.is_file():
            raise TriageError(f"model bundle incomplete: {weights} not found")
        try:
            session = open_session(weights)
        except RadguardError as exc:
            raise TriageError(str(exc)) from exc
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise TriageError(f"{weights}: expected one input of shape (n, 1, h, w), got "
                              f"{[i.shape for i in inputs]}")
        return cls(meta, session)

    def run(self, batch: np.ndarray) -> np.ndarray:
        session = self.network
        name = session.get_inputs()[0].name  # type: ignore[attr-defined]
        try:
            out = session.run(None, {name: np.ascontiguousarray(batch, np.float32)})[0]  # type: ignore[attr-defined]
        except Exception as exc:
            raise TriageError(f"{self.card.name}: the ONNX model failed on this input "
                              f"({exc})") from exc
        out = np.asarray(out)
        if out.size != len(batch):
            raise TriageError(f"{self.card.name}: the ONNX model returned {out.shape} for "
                              f"{len(batch)} images (one logit per image expected)")
        return out.reshape(len(batch))

    def saliency(self, pixels: np.ndarray) -> np.ndarray:
        return self.occlusion_saliency(pixels)


class PatchTriageModel(TorchTriageModel):
    """A patch classifier slid over the image: the image score is the mean of the top three
    patch logits, and the patch probabilities are the saliency map (so a finding is
    localised where the network actually looked, not by a gradient heuristic)."""

    def __init__(self, meta: dict, network: object) -> None:
        super().__init__(meta, network)
        try:
            self.patch = int(meta["patch"])
            self.stride = int(meta["stride"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TriageError(f"malformed patch-model bundle ({exc})") from exc

    def patch_logits(self, image: np.ndarray) -> np.ndarray:
        """Logit of every patch of one preprocessed (1, size, size) image, as a grid."""
        windows = np.lib.stride_tricks.sliding_window_view(image[0], (self.patch, self.patch))
        windows = windows[:: self.stride, :: self.stride]
        grid = windows.shape[:2]
        batch = np.ascontiguousarray(windows.reshape(-1, 1, self.patch, self.patch), np.float32)
        return self.run(batch).reshape(grid).astype(np.float64)

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        scores = []
        for image in batch:
            flat = np.sort(self.patch_logits(image).ravel())
            scores.append(float(flat[-3:].mean()))
        return np.array(scores)

    def saliency(self, pixels: np.ndarray) -> np.ndarray:
        from PIL import Image

        grey = grey_2d(pixels)
        prob = 1 / (1 + np.exp(-self.patch_logits(self.preprocess(grey))))
        # each patch's probability at its centre, then bilinear over the image
        n = self.size
        full = np.zeros((n, n), np.float32)
        gy, gx = prob.shape
        y0 = self.patch // 2
        small = Image.fromarray(prob.astype(np.float32), mode="F").resize(
            ((gx - 1) * self.stride + 1, (gy - 1) * self.stride + 1), Image.Resampling.BILINEAR)
        full[y0 : y0 + small.size[1], y0 : y0 + small.size[0]] = np.asarray(small)
        heat = Image.fromarray(full, mode="F").resize((grey.shape[1], grey.shape[0]),
                                                      Image.Resampling.BILINEAR)
        return np.clip(np.asarray(heat), 0.0, 1.0)


class RegionTriageModel(TorchTriageModel):
    """A second-stage model that judges the regions another (patch) model finds most
    suspicious: the ``locator`` bundle's top ``regions`` patch peaks (at least a patch apart)
    are cut out at this model's resolution, each scored, and the image score is the highest.
    Its saliency is the locator's map, since that is where it looked."""

    def __init__(self, meta: dict, network: object, *, base: Path) -> None:
        super().__init__(meta, network)
        try:
            self.region, self.regions = int(meta["region"]), int(meta.get("regions", 3))
            locator = str(meta["locator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TriageError(f"malformed region-model bundle ({exc})") from exc
        if locator.endswith(".json") and not Path(locator).is_absolute():
            locator = str(base / locator)
        found = load_model(locator)
        if not isinstance(found, PatchTriageModel):
            raise TriageError(f"{self.card.name}: locator '{locator}' is not a patch model")
        self.locator = found

    def centres(self, image: np.ndarray) -> list[tuple[float, float]]:
        """(y, x) of the locator's most suspicious patches in a preprocessed image, in this
        model's pixel units, highest first."""
        from radguard.triage.networks import region_input

        loc = self.locator
        small = region_input(image, loc.size)
        small = (small - small.mean()) / (small.std() + 1e-6)
        grid = loc.patch_logits(small)
        scale = self.size / loc.size
        gap = max(1, loc.patch // loc.stride)
        taken: list[tuple[int, int]] = []
        for flat in np.argsort(-grid, axis=None):
            r, c = divmod(int(flat), grid.shape[1])
            if all(max(abs(r - a), abs(c - b)) >= gap for a, b in taken):
                taken.append((r, c))
            if len(taken) == self.regions:
                break
        half = loc.patch / 2
        return [((r * loc.stride + half) * scale, (c * loc.stride + half) * scale)
                for r, c in taken]

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        from radguard.triage.networks import region_input

        scores = []
        half = self.region // 2
        for image in batch:
            windows = []
            for cy, cx in self.centres(image):
                y0 = int(np.clip(round(cy) - half, 0, self.size - self.region))
                x0 = int(np.clip(round(cx) - half, 0, self.size - self.region))
                windows.append(region_input(image[:, y0:y0 + self.region, x0:x0 + self.region],
                                            int(self.meta["network"]["input_size"])))
            scores.append(float(self.run(np.stack(windows)).max()))
        return np.array(scores)

    def saliency(self, pixels: np.ndarray) -> np.ndarray:
        return self.locator.saliency(pixels)


_DATA = Path(__file__).with_name("data")
register_model("chest", lambda: load_bundle(_DATA / "chest.json"))
register_model("mammo", lambda: load_bundle(_DATA / "mammo.json"))
