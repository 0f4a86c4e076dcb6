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

import numpy as np

from radguard.triage.scores import Calibrator, SuspicionScale, TriageError

__all__ = ["ModelCard", "OutOfScope", "PatchTriageModel", "Prediction", "TorchTriageModel",
           "TriageModel",
           "available_models", "load_model", "register_model"]


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
    """A registered model by name, or a bundle by the path of its JSON file."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name.endswith(".json"):
        return TorchTriageModel.from_bundle(Path(name))
    raise TriageError(f"unknown model '{name}' (available: {', '.join(available_models())}, "
                      "or the path of a bundle's .json file)")


def grey_2d(pixels: np.ndarray) -> np.ndarray:
    """A 2D grey image, or OutOfScope for colour photos and malformed arrays."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float64)
        if np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean() > 2.0:
            raise OutOfScope("a colour image, not a radiograph")
        a = rgb.mean(axis=-1)
    if a.ndim != 2 or a.dtype.kind not in "uifb":
        raise OutOfScope(f"expected a 2D grey image, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise OutOfScope("image holds NaN or infinite values")
    return a.astype(np.float32)


class TorchTriageModel(TriageModel):
    """A PyTorch network from a bundle (``.json`` metadata + ``.pt`` state dict)."""

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

    @classmethod
    def from_bundle(cls, json_path: Path) -> TorchTriageModel:
        import torch

        from radguard.triage.networks import build_network

        try:
            meta = json.loads(json_path.read_text())
            state = torch.load(json_path.with_suffix(".pt"), map_location="cpu")
        except FileNotFoundError as exc:
            raise TriageError(f"model bundle incomplete: {exc.filename} not found") from exc
        except (OSError, ValueError, RuntimeError) as exc:
            raise TriageError(f"{json_path}: unreadable model bundle ({exc})") from exc
        net = build_network(meta.get("network", {}))
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            raise TriageError(f"{json_path}: weights do not fit the network ({exc})") from exc
        net.eval()
        kind = meta.get("kind", "image")
        if kind == "patch":
            return PatchTriageModel(meta, net)
        if kind != "image":
            raise TriageError(f"{json_path}: unknown model kind '{kind}'")
        return cls(meta, net)

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

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.network(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return out.reshape(len(batch)).numpy().astype(np.float64)

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
        import torch

        windows = np.lib.stride_tricks.sliding_window_view(image[0], (self.patch, self.patch))
        windows = windows[:: self.stride, :: self.stride]
        grid = windows.shape[:2]
        batch = np.ascontiguousarray(windows.reshape(-1, 1, self.patch, self.patch), np.float32)
        with torch.no_grad():
            out = self.network(torch.from_numpy(batch)).reshape(-1).numpy()
        return out.reshape(grid).astype(np.float64)

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


_DATA = Path(__file__).with_name("data")
register_model("chest", lambda: TorchTriageModel.from_bundle(_DATA / "chest.json"))
register_model("mammo", lambda: TorchTriageModel.from_bundle(_DATA / "mammo.json"))
