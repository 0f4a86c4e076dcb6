"""Synthetic radiographs for training and testing the synthetic-image detector.

No AI-generated radiographs exist in ../shared/data beyond 64 DCGAN samples, so this module
makes its own, from seven generator families that mimic what real generators leave behind:

* ``upsample``  - low-resolution synthesis then interpolation to the delivery size
  (GAN / diffusion outputs are often made small and upscaled): real image shrunk 2-4x and
  enlarged back with bilinear, bicubic or Lanczos kernels;
* ``grain``     - over-smooth anatomy with signal-independent synthetic grain, the readers'
  tell "uniform grain, overly smooth bones": Gaussian / median smoothing + additive grain;
* ``autoencoder`` - a latent decoder's fingerprint (latent diffusion decodes through one):
  a small convolutional autoencoder with transposed-convolution decoder, trained here on CPU
  on real radiograph patches, reconstructs whole images;
* ``dcgan``     - a small DCGAN trained here on CPU on 64 x 64 chest and mammography images;
  its samples are whole new images, not edits of a real one;
* ``airbrush``  - the clean, rendered look of text-to-image radiographs: edge-preserving
  (bilateral) smoothing, sharpened edges, sometimes a faint even grain;
* ``nn_decoder`` - a second latent decoder, upsampling by nearest neighbour + convolution as
  Stable Diffusion's VAE does (a different fingerprint from transposed convolutions);
* ``super_resolution`` - synthesis at 1/4 size enlarged by a learned sub-pixel (ESPCN-style)
  upscaler, trained here on CPU.

Every real and fake image then goes through the same random *laundering* (square resize to
64-512 px, for a quarter of them from a smaller copy so that enlargement happens to real images
too, then a JPEG round trip or lossless), so nothing the attacker or the evaluator controls for
free - format, canvas size, bit depth, interpolation on resizing - separates the classes.

Splits are by patient (cxr-nih, cxr-kermany), by woman (mammo-mias pair_id) and by image
(cxr-wild), hashed, so a patient's images and the fakes derived from them stay on one side.

Outside generators and every real source (issue 22): :func:`real_sources` lists every real
radiograph of ../shared/data (the four raster sets, the real crops of synthetic-stylegan2-cxr,
the real rows of mammo-cbis-patches, the projection radiographs of dicom/) and
:func:`generated_images` every outside generator's output (PGGAN-150k, PGGAN-160k, cGAN,
StyleGAN2, CBIS-DCGAN, DCGAN64). A *population* is what a leave-one-source-out fold removes
as a whole (cxr-wild and the StyleGAN2 real crops share one, and a generator belongs to the
population it was trained on); :data:`GENERATOR_REALS` says which real images, delivered how
(:func:`deliver`), a generator's fakes are compared with, so size never tells them apart.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from radguard.evaluation.splits import split_of

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GENERATOR_DIR = REPO / "scripts" / "generators"
FAMILIES = ("upsample", "grain", "autoencoder", "dcgan", "airbrush", "nn_decoder",
            "super_resolution")
LEARNED = ("autoencoder", "nn_decoder", "super_resolution", "dcgan")  # need scripts/generators
LAUNDER_SIZES = (64, 128, 256, 384, 512)
LAUNDER_P = (0.1, 0.15, 0.3, 0.15, 0.3)
UPSCALE_P = 0.25  # share of images (real and fake alike) that are enlarged by the laundering


@dataclass(frozen=True)
class RealImage:
    path: Path
    group: str  # patient / woman / image: the unit of splitting
    source: str  # data set name

    @property
    def split(self) -> str:
        """train (70%), val (15%) or test (15%), stable across runs and machines."""
        return split_of(self.source, self.group)


def real_images() -> list[RealImage]:
    """Every real radiograph of the shared raster sets, with its splitting group."""
    out: list[RealImage] = []
    specs = {
        "cxr-nih": "patient_id",
        "cxr-kermany": "patient_id",
        "mammo-mias": "pair_id",
        "cxr-wild": "file",
    }
    for source, key in specs.items():
        seen: set[str] = set()
        with open(SHARED / source / "labels.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["file"] in seen:  # MIAS lists two-lesion images twice
                    continue
                seen.add(row["file"])
                out.append(RealImage(SHARED / source / "images" / row["file"], row[key], source))
    return out


def load(path: Path) -> np.ndarray:
    """8-bit grey pixels of a raster file, or a DICOM radiograph's display frame (what a
    reader sees and what ``radguard scan`` analyses)."""
    if path.suffix.lower() == ".dcm":
        from radguard.dicom.io import read_dataset
        from radguard.images import display_frame

        return np.asarray(display_frame(read_dataset(path, stop_before_pixels=False)))
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# ------------------------------------------------------------- every real source and generator

# Every real source of ../shared/data. A *population* is what a held-out fold removes as a
# whole: the real crops of synthetic-stylegan2-cxr come from the covid-chestxray-dataset, as
# cxr-wild does, so neither may be trained on when the other is held out.
REAL_SOURCES = ("cxr-nih", "cxr-kermany", "mammo-mias", "cxr-wild", "stylegan2-real",
                "cbis-real", "dicom")
POPULATION = {"cxr-nih": "nih", "cxr-kermany": "kermany", "mammo-mias": "mias",
              "cxr-wild": "covid-chestxray", "stylegan2-real": "covid-chestxray",
              "cbis-real": "cbis", "dicom": "dicom"}
# the outside generators of ../shared/data: which population each was trained on (so a fold
# that holds a population out drops them too) and how its real counterpart is delivered
GENERATOR_SETS = ("PGGAN-150k", "PGGAN-160k", "cGAN", "StyleGAN2", "CBIS-DCGAN", "DCGAN64")
GENERATOR_POPULATION = {"PGGAN-150k": "kermany", "PGGAN-160k": "kermany", "cGAN": "kermany",
                        "StyleGAN2": "covid-chestxray", "CBIS-DCGAN": "cbis",
                        "DCGAN64": "kermany"}
# the real images a generator's fakes are compared with: (source, variant) - the gan-cxr
# fakes are 128 px squares from paediatric images, so they meet cxr-kermany brought to
# 128 px squares by the same path (else a detector learns the size, not the generator)
GENERATOR_REALS = {"PGGAN-150k": ("cxr-kermany", "deliver128"),
                   "PGGAN-160k": ("cxr-kermany", "deliver128"),
                   "cGAN": ("cxr-kermany", "deliver128"),
                   "StyleGAN2": ("stylegan2-real", "none"),
                   "CBIS-DCGAN": ("cbis-real", "none"),
                   "DCGAN64": ("cxr-kermany", "deliver64")}
RADIOGRAPH_MODALITIES = ("CR", "DX", "MG", "RF", "XA", "PX", "IO")


@dataclass(frozen=True)
class SourceImage:
    """One image of ../shared/data: a real radiograph (``family`` "real") or an outside
    generator's output, with its source, population and split."""

    path: Path
    source: str  # real source, or the generator set's name
    family: str  # "real" or the generator set
    split: str  # train / val / test (DICOM radiographs: test only, never trained on)

    @property
    def population(self) -> str:
        return POPULATION[self.source] if self.family == "real" else \
            GENERATOR_POPULATION[self.family]

    def load(self) -> np.ndarray:
        return load(self.path)


def _labels(name: str) -> list[dict[str, str]]:
    """The rows of a shared set's labels.csv."""
    with open(SHARED / name / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _labelled(name: str, keep: Callable[[dict[str, str]], bool], source: str, family: str,
              *, split_column: bool = False) -> list[SourceImage]:
    """The images of a shared set whose labels.csv row passes ``keep``, split by the set's
    own split column or (default) hashed by file."""
    return [SourceImage(SHARED / name / row["file"], source, family,
                        row["split"] if split_column else split_of(source, row["file"]))
            for row in _labels(name) if keep(row)]


def real_sources() -> list[SourceImage]:
    """Every real radiograph of ../shared/data: the four raster sets of :func:`real_images`
    (same splits), the real crops of synthetic-stylegan2-cxr (split by image), the real rows
    of mammo-cbis-patches (that set's patient-disjoint splits) and the readable projection
    radiographs of dicom/ (test only)."""
    out = [SourceImage(r.path, r.source, "real", r.split) for r in real_images()]
    out += _labelled("synthetic-stylegan2-cxr", lambda r: r["label"] == "real",
                     "stylegan2-real", "real")
    out += _labelled("mammo-cbis-patches", lambda r: r["synthetic"].strip() == "0",
                     "cbis-real", "real", split_column=True)
    from radguard.dicom.io import read_dataset
    from radguard.errors import RadguardError

    for path in sorted((SHARED / "dicom").rglob("*.dcm")):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            if str(getattr(ds, "Modality", "")).upper() not in RADIOGRAPH_MODALITIES:
                continue
            load(path)  # pixels that cannot be decoded are no radiograph to judge
        except RadguardError:
            continue
        out.append(SourceImage(path, "dicom", "real", "test"))
    return out


def generated_images() -> list[SourceImage]:
    """Every outside generator's output in ../shared/data, split by file (hashed 70/15/15)."""
    out: list[SourceImage] = []
    for row in _labels("synthetic-gan-cxr"):
        fam = row["generator"]
        out.append(SourceImage(SHARED / "synthetic-gan-cxr" / row["file"], fam, fam,
                               split_of(fam, row["file"])))
    out += _labelled("synthetic-stylegan2-cxr", lambda r: r["label"] == "synthetic",
                     "StyleGAN2", "StyleGAN2")
    out += _labelled("mammo-cbis-patches", lambda r: r["synthetic"].strip() == "1",
                     "CBIS-DCGAN", "CBIS-DCGAN")
    for path in sorted((SHARED / "synthetic-dcgan64").glob("*.png")):
        out.append(SourceImage(path, "DCGAN64", "DCGAN64", split_of("DCGAN64", path.name)))
    return out


def deliver(img: np.ndarray, size: int) -> np.ndarray:
    """A real image brought the way the outside generators' training images were: squashed
    to a ``size`` x ``size`` square with an antialiasing kernel, kept lossless."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def launder(
    img: np.ndarray, rng: np.random.Generator, size: int | None = None, quality: int | None = None
) -> np.ndarray:
    """Square resize and an optional JPEG round trip, as an evaluator or a PACS export would."""
    if size is None:
        size = int(rng.choice(LAUNDER_SIZES, p=LAUNDER_P))
        if rng.random() < UPSCALE_P:  # a small original enlarged to the common size
            small = max(32, int(size * rng.uniform(0.25, 0.8)))
            img = np.asarray(Image.fromarray(img).resize((small, small), Image.Resampling.BOX))
    kernel = [
        Image.Resampling.BILINEAR,
        Image.Resampling.BICUBIC,
        Image.Resampling.LANCZOS,
        Image.Resampling.BOX,
    ][int(rng.integers(4))]
    im = Image.fromarray(img).resize((size, size), kernel)
    if quality is None and rng.random() < 0.7:
        quality = int(rng.integers(70, 98))
    if quality:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        im = Image.open(buf)
        im.load()
    return np.asarray(im)


def fake_upsample(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = float(rng.uniform(2.0, 4.0))
    h, w = img.shape
    small = Image.fromarray(img).resize(
        (max(8, round(w / k)), max(8, round(h / k))), Image.Resampling.BOX
    )
    kernel = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS][
        int(rng.integers(3))
    ]
    return np.asarray(small.resize((w, h), kernel))


def _bilateral(a: np.ndarray, radius: int, sigma_s: float, sigma_r: float) -> np.ndarray:
    """Edge-preserving smoothing: neighbours weighted by distance and by grey difference."""
    pad = np.pad(a, radius, mode="reflect")
    num = np.zeros_like(a)
    den = np.zeros_like(a)
    h, w = a.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            n = pad[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
            wgt = np.exp(-(dy * dy + dx * dx) / (2 * sigma_s**2) - (n - a) ** 2 / (2 * sigma_r**2))
            num += wgt * n
            den += wgt
    return num / den


def fake_airbrush(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clean, 'rendered' look of text-to-image radiographs: edge-preserving smoothing of
    soft tissue and bone, edges then sharpened, sometimes a faint even grain."""
    a = img.astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        a = _bilateral(a, 2, float(rng.uniform(1.0, 2.5)), float(rng.uniform(6.0, 20.0)))
    blur = ndimage.gaussian_filter(a, float(rng.uniform(1.0, 2.5)))
    a = a + float(rng.uniform(0.3, 1.2)) * (a - blur)
    if rng.random() < 0.3:
        a = a + rng.normal(0.0, float(rng.uniform(0.3, 1.0)), a.shape).astype(np.float32)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def fake_grain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = img.astype(np.float32)
    if rng.random() < 0.5:
        a = ndimage.gaussian_filter(a, float(rng.uniform(0.8, 2.0)))
    else:
        a = ndimage.median_filter(a, int(rng.choice([3, 5])))
    grain = rng.normal(0.0, float(rng.uniform(0.7, 3.0)), a.shape).astype(np.float32)
    if rng.random() < 0.5:  # film-like, slightly correlated grain
        grain = ndimage.gaussian_filter(grain, float(rng.uniform(0.4, 0.9)))
        grain *= float(rng.uniform(1.5, 2.5))
    return np.clip(np.round(a + grain), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- torch families


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)  # one core: the machine is shared
    return torch


def autoencoder_net() -> Any:  # torch is imported lazily
    torch = _torch()
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(64, 4, 4, 2, 1),  # 4-channel latent at 1/8 resolution, as in latent diffusion
        nn.ConvTranspose2d(4, 64, 4, 2, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 4, 2, 1),
    )


def nn_decoder_net() -> Any:
    """Autoencoder whose decoder upsamples by nearest neighbour + convolution (the decoder
    shape of Stable Diffusion's VAE), latent 4 x 1/8 as in latent diffusion."""
    torch = _torch()
    nn = torch.nn

    def up(cin: int, cout: int) -> list:
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1),
                nn.SiLU()]

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(32, 48, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(48, 4, 3, 2, 1),
        nn.Conv2d(4, 48, 3, 1, 1), nn.SiLU(),
        *up(48, 48), *up(48, 32), *up(32, 32),
        nn.Conv2d(32, 1, 3, 1, 1),
    )


def super_resolution_net() -> Any:
    """ESPCN-style 4x super-resolution (sub-pixel convolution), the upscaler of generators
    that synthesise small and deliver large."""
    torch = _torch()
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 48, 5, 1, 2), nn.Tanh(),
        nn.Conv2d(48, 32, 3, 1, 1), nn.Tanh(),
        nn.Conv2d(32, 16, 3, 1, 1),
        nn.PixelShuffle(4),
    )


def dcgan_generator(nz: int = 64, ngf: int = 16) -> Any:
    torch = _torch()
    nn = torch.nn
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


def dcgan_discriminator(ndf: int = 16) -> Any:
    torch = _torch()
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, ndf, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 8),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
    )


def _descend(optimiser: Any, loss: Any) -> None:
    """One gradient step."""
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def _patches(images: list[np.ndarray], rng: np.random.Generator, n: int, size: int
             ) -> np.ndarray:
    batch = []
    for _ in range(n):
        img = images[int(rng.integers(len(images)))]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        batch.append(img[y : y + size, x : x + size])
    return np.stack(batch)[:, None].astype(np.float32) / 127.5 - 1


def train_autoencoder(images: list[np.ndarray], steps: int, seed: int = 0,
                      kind: str = "autoencoder") -> None:
    """Fit an autoencoder (``autoencoder``: transposed-convolution decoder, ``nn_decoder``:
    nearest-neighbour + convolution decoder) on random 64 x 64 patches of training-split
    reals; save its weights."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = autoencoder_net() if kind == "autoencoder" else nn_decoder_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        t = torch.from_numpy(_patches(images, rng, 32, 64))
        loss = torch.nn.functional.l1_loss(net(t), t)
        _descend(opt, loss)
        if step % 200 == 0:
            print(f"  {kind} step {step}: L1 {loss.item():.4f}", flush=True)
    GENERATOR_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, GENERATOR_DIR / f"{kind}.pt")


def train_super_resolution(images: list[np.ndarray], steps: int, seed: int = 0) -> None:
    """Fit the 4x super-resolution net: 64 x 64 real patches from their 16 x 16 box means."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = super_resolution_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(steps):
        t = torch.from_numpy(_patches(images, rng, 32, 64))
        small = torch.nn.functional.avg_pool2d(t, 4)
        loss = torch.nn.functional.l1_loss(net(small), t)
        _descend(opt, loss)
        if step % 200 == 0:
            print(f"  super-resolution step {step}: L1 {loss.item():.4f}", flush=True)
    GENERATOR_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in net.state_dict().items()},
               GENERATOR_DIR / "super_resolution.pt")


def train_dcgan(images: list[np.ndarray], steps: int, seed: int = 0) -> None:
    """Standard DCGAN (Radford et al. 2016) at 64 x 64 on training-split reals; save G."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    small = (
        np.stack(
            [np.asarray(Image.fromarray(i).resize((64, 64), Image.Resampling.BOX)) for i in images]
        ).astype(np.float32)
        / 127.5
        - 1
    )
    g, d = dcgan_generator(), dcgan_discriminator()
    og = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    for step in range(steps):
        real = torch.from_numpy(small[rng.integers(0, len(small), 64)][:, None])
        z = torch.randn(64, 64, 1, 1)
        fake = g(z)
        ld = bce(d(real).view(-1), torch.ones(64)) + bce(d(fake.detach()).view(-1), torch.zeros(64))
        _descend(od, ld)
        lg = bce(d(fake).view(-1), torch.ones(64))
        _descend(og, lg)
        if step % 250 == 0:
            print(f"  dcgan step {step}: D {ld.item():.3f} G {lg.item():.3f}", flush=True)
    GENERATOR_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in g.state_dict().items()},
        GENERATOR_DIR / "dcgan_g.pt",
    )


class TorchFamilies:
    """The learned generators, loaded once from scripts/generators/."""

    def __init__(self) -> None:
        torch = _torch()
        self.torch = torch

        def load(net: Any, name: str) -> Any:
            net.load_state_dict(
                {k: v.float() for k, v in torch.load(GENERATOR_DIR / name).items()}
            )
            return net.eval()

        self.ae = load(autoencoder_net(), "autoencoder.pt")
        self.nn_ae = load(nn_decoder_net(), "nn_decoder.pt")
        self.sr = load(super_resolution_net(), "super_resolution.pt")
        self.g = dcgan_generator()
        self.g.load_state_dict(
            {
                k: v.float() if v.is_floating_point() else v
                for k, v in torch.load(GENERATOR_DIR / "dcgan_g.pt").items()
            }
        )
        self.g.eval()

    def _run(self, net: Any, img: np.ndarray) -> np.ndarray:
        h, w = (img.shape[0] // 8) * 8, (img.shape[1] // 8) * 8
        t = self.torch.from_numpy(img[:h, :w].astype(np.float32)[None, None] / 127.5 - 1)
        with self.torch.no_grad():
            out = net(t)[0, 0].numpy()
        return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)

    def autoencoder(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._run(self.ae, img)

    def nn_decoder(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._run(self.nn_ae, img)

    def super_resolution(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The real image at 1/4 size (box means), enlarged again by the learned upscaler."""
        h, w = (img.shape[0] // 8) * 8, (img.shape[1] // 8) * 8
        small = img[:h, :w].astype(np.float32).reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
        t = self.torch.from_numpy(small[None, None] / 127.5 - 1)
        with self.torch.no_grad():
            out = self.sr(t)[0, 0].numpy()
        return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)

    def dcgan(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seed = int(rng.integers(2**31))
        gen = self.torch.Generator().manual_seed(seed)
        with self.torch.no_grad():
            out = self.g(self.torch.randn(1, 64, 1, 1, generator=gen))[0, 0].numpy()
        return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


def make_fake(
    family: str, img: np.ndarray, rng: np.random.Generator, torch_families: TorchFamilies | None
) -> np.ndarray:
    if family == "upsample":
        return fake_upsample(img, rng)
    if family == "grain":
        return fake_grain(img, rng)
    if family == "airbrush":
        return fake_airbrush(img, rng)
    if torch_families is None:
        raise RuntimeError(f"family {family} needs the trained generators")
    return getattr(torch_families, family)(img, rng)
