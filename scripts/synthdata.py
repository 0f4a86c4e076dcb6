"""Synthetic radiographs for training and testing the synthetic-image detector.

No AI-generated radiographs exist in ../shared/data beyond 64 DCGAN samples, so this module
makes its own, from four generator families that mimic what real generators leave behind:

* ``upsample``  - low-resolution synthesis then interpolation to the delivery size
  (GAN / diffusion outputs are often made small and upscaled): real image shrunk 2-4x and
  enlarged back with bilinear, bicubic or Lanczos kernels;
* ``grain``     - over-smooth anatomy with signal-independent synthetic grain, the readers'
  tell "uniform grain, overly smooth bones": Gaussian / median smoothing + additive grain;
* ``autoencoder`` - a latent decoder's fingerprint (latent diffusion decodes through one):
  a small convolutional autoencoder with transposed-convolution decoder, trained here on CPU
  on real radiograph patches, reconstructs whole images;
* ``dcgan``     - a small DCGAN trained here on CPU on 64 x 64 chest and mammography images;
  its samples are whole new images, not edits of a real one.

Every real and fake image then goes through the same random *laundering* (square resize to
64-512 px, for a quarter of them from a smaller copy so that enlargement happens to real images
too, then a JPEG round trip or lossless), so nothing the attacker or the evaluator controls for
free - format, canvas size, bit depth, interpolation on resizing - separates the classes.

Splits are by patient (cxr-nih, cxr-kermany), by woman (mammo-mias pair_id) and by image
(cxr-wild), hashed, so a patient's images and the fakes derived from them stay on one side.
"""

from __future__ import annotations

import csv
import io
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
FAMILIES = ("upsample", "grain", "autoencoder", "dcgan")
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
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


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


def _torch() -> Any:  # noqa: ANN401
    import torch

    torch.set_num_threads(2)
    return torch


def autoencoder_net() -> Any:  # noqa: ANN401 (torch is imported lazily)
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


def dcgan_generator(nz: int = 64, ngf: int = 16) -> Any:  # noqa: ANN401
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


def dcgan_discriminator(ndf: int = 16) -> Any:  # noqa: ANN401
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


def _descend(optimiser: Any, loss: Any) -> None:  # noqa: ANN401
    """One gradient step."""
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def train_autoencoder(images: list[np.ndarray], steps: int, seed: int = 0) -> None:
    """Fit the autoencoder on random 64 x 64 patches of training-split reals; save weights."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = autoencoder_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        batch = []
        for _ in range(32):
            img = images[int(rng.integers(len(images)))]
            y, x = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
            batch.append(img[y : y + 64, x : x + 64])
        t = torch.from_numpy(np.stack(batch)[:, None].astype(np.float32) / 127.5 - 1)
        loss = torch.nn.functional.l1_loss(net(t), t)
        _descend(opt, loss)
        if step % 200 == 0:
            print(f"  autoencoder step {step}: L1 {loss.item():.4f}", flush=True)
    GENERATOR_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, GENERATOR_DIR / "autoencoder.pt")


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
    """The two learned generators, loaded once from scripts/generators/."""

    def __init__(self) -> None:
        torch = _torch()
        self.torch = torch
        self.ae = autoencoder_net()
        self.ae.load_state_dict(
            {k: v.float() for k, v in torch.load(GENERATOR_DIR / "autoencoder.pt").items()}
        )
        self.ae.eval()
        self.g = dcgan_generator()
        self.g.load_state_dict(
            {
                k: v.float() if v.is_floating_point() else v
                for k, v in torch.load(GENERATOR_DIR / "dcgan_g.pt").items()
            }
        )
        self.g.eval()

    def autoencoder(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = (img.shape[0] // 8) * 8, (img.shape[1] // 8) * 8
        t = self.torch.from_numpy(img[:h, :w].astype(np.float32)[None, None] / 127.5 - 1)
        with self.torch.no_grad():
            out = self.ae(t)[0, 0].numpy()
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
    if torch_families is None:
        raise RuntimeError(f"family {family} needs the trained generators")
    return getattr(torch_families, family)(img, rng)
