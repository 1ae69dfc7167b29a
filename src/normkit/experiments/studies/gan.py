"""The ``gan`` study (Gong et al., Sandwich Batch Normalization, arXiv 2102.11382): SaBN
against CCBN in the generator of a class-conditional GAN on the 8×8 digits.

The paper's claim: replacing the generator's categorical conditional BN (CCBN) by Sandwich BN
(SaBN, shared statistics, one shared affine under the per-class ones) improves conditional image
generation: a lower FID and a higher Inception score (SNGAN on CIFAR-10: FID 10.18 → 8.97).

Setup (``reference/core-methods.md`` §1.2 "GAN SaBN" and §1.6 C, shrunk to 8×8 digits):

* Data: scikit-learn's 8×8 digits through :func:`normkit.experiments.data.digits_split` (1347
  train / 450 test, stratified, ``random_state=0``). The GAN and the scoring classifier train on
  the 1347 training images, scaled to [-1, 1] for the GAN; the 450 test images are the held-out
  real set of the Fréchet distance.
* Generator (a small DCGAN-style net; the SNGAN residual generator of the paper, shrunk until a
  run fits the CPU budget): ``z`` (``z_dim``) → linear → 2w×4×4 (``w = g_width``), norm, ReLU,
  3×3 conv, norm, ReLU, 4×4 transposed conv (stride 2) to w×8×8, then an *unconditional*
  ``nn.BatchNorm2d``, ReLU, a 3×3 conv to one channel and ``tanh`` (as the official generator,
  whose last BN is unconditional). Its two hidden norms are the method's, each given the
  per-sample class: ``ccbn`` is :class:`normkit.CategoricalConditionalBatchNorm2d`, ``sabn`` is
  :class:`normkit.SandwichBatchNorm2d` with shared statistics. Both start their per-class
  scales at N(1, 0.02²) and shifts at 0; SaBN's shared scale starts at N(1, 0.02²)
  (``shared_std=0.02``), as the official training script re-initialises it; no weight decay
  (Adam, as the official). Convs and linears use Xavier-uniform init (the official
  ``xavier_uniform``) and are built before the norms, so for a given seed both methods start
  from the same generator weights and the same discriminator.
* Discriminator: a projection discriminator (Miyato & Koyama 2018) with spectral norm on every
  conv, the linear head ``ψ`` and the class embedding: three convs (3×3 at 8×8, then two 4×4 of
  stride 2 to 4×4 and 2×2, leaky ReLU 0.1), a ReLU and a sum over positions give ``h(x)``; the
  output is ``ψ(h(x)) + ⟨embed(y), h(x)⟩``.
* Training: hinge loss; Adam at ``lr`` 2e-4 with betas (0, 0.9) for both nets; ``n_critic``
  discriminator steps (a real batch of ``batch_size`` drawn without replacement from a per-epoch
  shuffle, and as many fakes with uniformly random pseudo-labels) per generator step (a batch of
  ``gen_batch_size`` with random pseudo-labels); ``iterations`` generator steps. Real and fake
  images go through the discriminator as one concatenated batch (it has no batch norm, so this
  only saves a forward; spectral norm then does one power iteration per step). The official
  run also keeps an exponential moving average of the generator's weights; this study scores the
  trained generator itself (at a few thousand steps an EMA of decay 0.999 lags far behind).
* Everything random in a run comes from the run's seed: the initialization, the real-batch
  shuffle, the noise and pseudo-labels (one generator), and the evaluation noise (another), so
  both methods see the same real batches, noise and labels (paired seeds).

Scoring, with a digits classifier trained within the study (a small BN CNN, Adam, ``clf_epochs``
epochs on the 1347 training images, seeded by the run's seed and cached per seed in the process,
so both methods of a seed are scored by the same classifier):

* samples are drawn in eval mode (running statistics, as the official ``validate``):
  ``eval_per_class`` per class with noise from the evaluation generator;
* ``cond_acc``: the fraction of samples the classifier assigns to their conditioning class (the
  claim's second metric; ``cond_acc_per_class`` per class);
* ``fd``: the Fréchet distance between Gaussians fitted (mean, covariance with ddof 1) to the
  classifier's penultimate features of the samples and of the 450 held-out real digits (FID with
  the digits classifier in place of Inception; the claim's first metric, lower is better);
* ``fd_real``: the same distance between the 1347 training digits and the held-out ones (the
  same for both methods of a seed). The distance is biased upward at small samples, so a
  perfect generator scored on 450 samples would read more (about 0.19 against 0.08 here);
* ``clf_test_acc``: the classifier's accuracy on the held-out digits;
* ``curve_fd``, ``curve_cond_acc``: the two scores at ``eval_points`` evenly spaced points of
  training (the last is the final score); ``curve_d_loss``, ``curve_g_loss``: the mean hinge
  losses over the steps between those points; ``final_d_loss``, ``final_g_loss``;
* ``sample_grid``: ``grid_per_class`` samples per class for the report's figure, the same noise
  in every row: ``{"classes", "per_class", "height", "width", "hex"}``, ``hex`` one string per
  class of ``per_class × 64`` pixels in [0, 1] quantized to bytes (0–255), row-major. It is
  neither a scalar nor a curve, so the runner stores it without aggregating it.

What to expect: the GAN needs about a thousand generator steps at this learning rate before
its samples take the conditioning class, so ``--quick`` (200 steps, conditional accuracy about
0.11, FD about 7) is a smoke test whose verdicts are inconclusive; the default (1400 steps) is
where the comparison means something. Measured at the default sizes with 2 paired seeds only:
SaBN ahead on both seeds on both scores (FD 1.58 ± 0.36 against 1.70 ± 0.29; conditional
accuracy 0.828 ± 0.033 against 0.808 ± 0.020), one-sided p ≈ 0.12 and 0.13: inconclusive at that
size; 5 seeds were not run while the study was written.

Time, 2 jobs of 1 thread on 2 CPU cores: ``--quick`` (2 seeds) took 39 s of wall time including
start-up on an idle machine (47 s of CPU in the runs). A default run (1400 generator steps, about
70 ms of CPU each: the nets are so small that per-op overhead dominates, whatever the widths)
used about 100 s of CPU, so the default study (5 seeds, 10 runs) needs about 1000 s of CPU, a
little over 8 minutes on 2 idle cores (``--iterations 1200`` keeps it under 8).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

import normkit as nk
from normkit.experiments.data import NUM_CLASSES, digits_split
from normkit.experiments.stats import finite_values, mean_std
from normkit.experiments.study import (
    Claim,
    ConfigError,
    Metrics,
    Progress,
    Run,
    Study,
    check_ints,
    check_methods,
    check_numbers,
    merge_config,
    option_flag,
    runs_by_method,
)

__all__ = [
    "METHODS",
    "STUDY",
    "Classifier",
    "Discriminator",
    "GanStudy",
    "Generator",
    "decode_grid",
    "frechet_distance",
    "gaussian_stats",
]

#: The study's methods: the generator's conditional norm.
METHODS: tuple[str, ...] = ("ccbn", "sabn")

#: One setting: class-conditional generation of the 8×8 digits.
SETTING = "digits8x8"

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "iterations": 1400,
    "n_critic": 2,
    "batch_size": 32,
    "gen_batch_size": 32,
    "lr": 2e-4,
    "beta1": 0.0,
    "beta2": 0.9,
    "z_dim": 32,
    "g_width": 16,
    "d_width": 16,
    "clf_epochs": 8,
    "eval_per_class": 45,
    "eval_points": 4,
    "grid_per_class": 8,
    "seeds": 5,
}
_QUICK: dict[str, Any] = {"iterations": 200, "seeds": 2}

_INT_KEYS = (
    "iterations",
    "n_critic",
    "batch_size",
    "gen_batch_size",
    "z_dim",
    "g_width",
    "d_width",
    "clf_epochs",
    "eval_per_class",
    "eval_points",
    "grid_per_class",
    "seeds",
)


# --------------------------------------------------------------------------------------------
# The Fréchet distance


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (ddof 1) of ``features`` (N, D), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(
            f"gaussian_stats: expected features of shape (N >= 2, D), got {tuple(features.shape)}"
        )
    f = features.detach().double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(cov: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The squared 2-Wasserstein (Fréchet) distance between N(mu1, cov1) and N(mu2, cov2).

    ``‖mu1 − mu2‖² + tr(cov1) + tr(cov2) − 2 tr((cov1 cov2)^{1/2})``, in float64. The trace of
    the square root is computed as ``tr((S cov2 S)^{1/2})`` with ``S = cov1^{1/2}``: the matrix
    under the root is then symmetric positive semi-definite, so its eigenvalues are real and
    clamped at 0 (no complex parts to discard, as ``scipy.linalg.sqrtm`` can leave).
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.sqrt().sum()
    return max(0.0, float(value))


# --------------------------------------------------------------------------------------------
# Models


def _xavier(*modules: nn.Module) -> None:
    for m in modules:
        weight = getattr(m, "weight", None)
        if isinstance(weight, Tensor):
            nn.init.xavier_uniform_(weight)
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor):
            nn.init.zeros_(bias)


def _norm_factory(method: str) -> Callable[[int], nn.Module]:
    if method == "ccbn":
        return lambda c: nk.CategoricalConditionalBatchNorm2d(c, NUM_CLASSES, domain_std=0.02)
    if method == "sabn":
        return lambda c: nk.SandwichBatchNorm2d(
            c, NUM_CLASSES, domain_std=0.02, shared_std=0.02, split_stats=False
        )
    raise ValueError(f"gan: unknown method {method!r}; known: {', '.join(METHODS)}")


class Generator(nn.Module):
    """``forward(z, y)``, ``y`` the per-sample class (N,): z → linear → 2w×4×4, conditional
    norm, ReLU, 3×3 conv (4×4), conditional norm, ReLU, 4×4 transposed conv (stride 2) to
    w×8×8, an unconditional BN, ReLU, 3×3 conv to one channel, ``tanh``."""

    def __init__(self, norm: Callable[[int], nn.Module], z_dim: int, width: int) -> None:
        super().__init__()
        w = width
        self.width = w
        self.fc = nn.Linear(z_dim, 2 * w * 16)
        self.conv = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.out_conv = nn.Conv2d(w, 1, 3, padding=1)
        _xavier(self.fc, self.conv, self.up, self.out_conv)
        # Norms last: for a given seed both methods get the same linear and conv weights.
        self.norms = nn.ModuleList(norm(2 * w) for _ in range(2))
        self.out_norm = nn.BatchNorm2d(w)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        x = self.fc(z).view(-1, 2 * self.width, 4, 4)
        x = self.conv(F.relu(self.norms[0](x, y)))
        x = self.up(F.relu(self.norms[1](x, y)))
        return torch.tanh(self.out_conv(F.relu(self.out_norm(x))))


class Discriminator(nn.Module):
    """A projection discriminator with spectral norm on every layer:
    ``D(x, y) = ψ(h(x)) + ⟨e_y, h(x)⟩``, ``h`` three convs (8×8 → 4×4 → 2×2) with leaky ReLUs,
    a ReLU and a sum over positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        convs = [
            nn.Conv2d(1, w, 3, padding=1),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1),
        ]
        linear = nn.Linear(2 * w, 1)
        embed = nn.Embedding(NUM_CLASSES, 2 * w)
        _xavier(*convs, linear, embed)
        self.convs = nn.ModuleList(spectral_norm(m) for m in convs)
        self.linear = spectral_norm(linear)
        self.embed = spectral_norm(embed)

    def features(self, x: Tensor) -> Tensor:
        """``h(x)``, shape (N, 2·width)."""
        c = self.convs
        x = F.leaky_relu(c[0](x), 0.1)
        x = F.leaky_relu(c[1](x), 0.1)
        return F.relu(c[2](x)).sum(dim=(2, 3))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


class Classifier(nn.Module):
    """The scoring classifier: three conv-BN-ReLU (8×8 → 4×4 → 2×2), global average pooling to
    the 32 penultimate features, and a linear head. Inputs in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@functools.lru_cache(maxsize=4)
def _classifier(seed: int, epochs: int) -> tuple[Classifier, float]:
    """The scoring classifier of ``seed`` (CPU, eval mode, frozen) and its held-out accuracy.

    Cached per (seed, epochs) in the process: both methods of a seed are scored by it. The
    result depends only on its arguments (and the intra-op thread count, fixed by the runner).
    """
    data = digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    shuffle = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=shuffle)
        for start in range(0, n - n % 32, 32):
            idx = perm[start : start + 32]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return model, acc


@functools.lru_cache(maxsize=4)
def _real_stats(seed: int, epochs: int) -> tuple[Tensor, Tensor, float]:
    """Held-out real feature statistics under the classifier of ``seed``, and ``fd_real``."""
    clf, _ = _classifier(seed, epochs)
    data = digits_split()
    with torch.no_grad():
        mu_test, cov_test = gaussian_stats(clf.features(data.x_test))
        mu_train, cov_train = gaussian_stats(clf.features(data.x_train))
    return mu_test, cov_test, frechet_distance(mu_train, cov_train, mu_test, cov_test)


def _build(method: str, config: Mapping[str, Any], seed: int) -> tuple[Generator, Discriminator]:
    norm = _norm_factory(method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        disc = Discriminator(int(config["d_width"]))
        gen = Generator(norm, int(config["z_dim"]), int(config["g_width"]))
    return gen, disc


def _hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


class _RealBatches:
    """Real batches drawn without replacement from per-epoch shuffles (incomplete batch
    dropped), the shuffle from ``generator``."""

    def __init__(self, n: int, batch: int, generator: torch.Generator) -> None:
        self.n, self.batch, self.generator = n, batch, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _to_unit(x: Tensor) -> Tensor:
    """Generator output in [-1, 1] to the classifier's [0, 1]."""
    return (x + 1.0) / 2.0


@torch.no_grad()
def _sample(gen: Generator, z: Tensor, y: Tensor) -> Tensor:
    """Eval-mode samples in [0, 1] (train mode restored)."""
    was_training = gen.training
    gen.eval()
    try:
        return _to_unit(gen(z, y))
    finally:
        gen.train(was_training)


def _scores(
    gen: Generator,
    clf: Classifier,
    z: Tensor,
    y: Tensor,
    real: tuple[Tensor, Tensor],
) -> tuple[float, float, list[float]]:
    """(fd, cond_acc, cond_acc_per_class) of ``gen`` on the evaluation noise ``z`` and classes
    ``y``, against the held-out real statistics ``real``."""
    x = _sample(gen, z, y)
    with torch.no_grad():
        feats = clf.features(x)
        correct = (clf.head(feats).argmax(1) == y).double()
    mu, cov = gaussian_stats(feats)
    fd = frechet_distance(mu, cov, *real)
    per_class = [float(correct[y == k].mean()) for k in range(NUM_CLASSES)]
    return fd, float(correct.mean()), per_class


def _encode_grid(images: Tensor) -> dict[str, Any]:
    """(classes, per_class, H, W) in [0, 1] → the JSON-friendly ``sample_grid``."""
    classes, per_class, h, w = images.shape
    q = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return {
        "classes": classes,
        "per_class": per_class,
        "height": h,
        "width": w,
        "hex": [bytes(q[k].flatten().tolist()).hex() for k in range(classes)],
    }


def decode_grid(grid: Mapping[str, Any]) -> Tensor:
    """The images of a ``sample_grid``: float (classes, per_class, H, W) in [0, 1]."""
    shape = (int(grid["per_class"]), int(grid["height"]), int(grid["width"]))
    rows = [
        torch.tensor(list(bytes.fromhex(text)), dtype=torch.float32).view(shape) / 255.0
        for text in grid["hex"]
    ]
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# The study


class GanStudy(Study):
    """CCBN against SaBN in the generator of a class-conditional SNGAN on the digits.

    ``figures(results, out_dir)`` writes ``gan_samples.png`` (a grid of generated digits, one row
    per conditioning class, one panel per method, from the first seed), ``gan_scores.png`` (FD
    and conditional accuracy per method, mean ± std over seeds with one dot per seed and the
    real-data reference levels) and ``gan_curves.png`` (both scores during training).
    """

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The sizes: ``methods`` (ccbn, sabn), ``iterations`` (generator steps: 1400; 200
        quick), ``n_critic`` (2 discriminator steps per generator step; the official 5 costs
        more than the budget allows), ``batch_size`` (32 real and 32 fake images per
        discriminator step), ``gen_batch_size`` (32), ``lr`` (2e-4), ``beta1`` (0), ``beta2``
        (0.9), ``z_dim`` (32), ``g_width`` and ``d_width`` (16 channels),
        ``clf_epochs`` (8: the scoring classifier's training), ``eval_per_class`` (45 samples
        per class for the scores), ``eval_points`` (4 points on the score curves),
        ``grid_per_class`` (8 samples per class in the figure) and ``seeds`` (5; 2 quick).

        An override of ``None`` keeps the default; a bad or unknown option raises
        :class:`ConfigError` naming it.
        """
        cfg = merge_config("gan", _DEFAULTS, _QUICK, quick, overrides)
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, SETTING, int(s)) for m in config["methods"] for s in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Train one GAN and score it (see the module docstring for the metrics)."""
        if run.method not in METHODS:
            raise ValueError(f"gan: unknown method {run.method!r}; known: {', '.join(METHODS)}")
        device = torch.device(config.get("device", "cpu"))
        iterations, n_critic = int(config["iterations"]), int(config["n_critic"])
        batch, gen_batch = int(config["batch_size"]), int(config["gen_batch_size"])
        z_dim = int(config["z_dim"])
        progress(0.0)

        clf, clf_acc = _classifier(run.seed, int(config["clf_epochs"]))
        mu_real, cov_real, fd_real = _real_stats(run.seed, int(config["clf_epochs"]))
        clf = clf.to(device)
        real_stats = (mu_real.to(device), cov_real.to(device))

        data = digits_split()
        x_real = (data.x_train * 2.0 - 1.0).to(device)
        y_real = data.y_train.to(device)

        gen, disc = _build(run.method, config, run.seed)
        gen, disc = gen.to(device).train(), disc.to(device).train()
        betas = (float(config["beta1"]), float(config["beta2"]))
        lr = float(config["lr"])
        opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)

        # Two streams from the run's seed: training (shuffle, noise, pseudo-labels) and
        # evaluation (noise), so evaluating more or less often changes no training step.
        train_rng = torch.Generator().manual_seed(2 * run.seed)
        eval_rng = torch.Generator().manual_seed(2 * run.seed + 1)
        per_class = int(config["eval_per_class"])
        eval_y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        eval_z = torch.randn(len(eval_y), z_dim, generator=eval_rng)
        k = int(config["grid_per_class"])
        grid_y = torch.arange(NUM_CLASSES).repeat_interleave(k)
        grid_z = torch.randn(k, z_dim, generator=eval_rng).repeat(NUM_CLASSES, 1)
        eval_z, eval_y = eval_z.to(device), eval_y.to(device)
        grid_z, grid_y = grid_z.to(device), grid_y.to(device)

        batches = _RealBatches(len(y_real), batch, train_rng)
        points = int(config["eval_points"])
        checkpoints = {max(1, round(iterations * (i + 1) / points)) for i in range(points)}
        curve_fd: list[float] = []
        curve_acc: list[float] = []
        curve_d: list[float] = []
        curve_g: list[float] = []
        d_sum = torch.zeros((), dtype=torch.float64, device=device)
        g_sum = torch.zeros((), dtype=torch.float64, device=device)
        seg_d = seg_g = 0
        last_d = last_g = math.nan
        for it in range(1, iterations + 1):
            for _ in range(n_critic):
                idx = batches.next().to(device)
                z = torch.randn(batch, z_dim, generator=train_rng).to(device)
                y_fake = torch.randint(0, NUM_CLASSES, (batch,), generator=train_rng).to(device)
                with torch.no_grad():
                    fake = gen(z, y_fake)
                out = disc(torch.cat([x_real[idx], fake]), torch.cat([y_real[idx], y_fake]))
                d_loss = _hinge_d(out[:batch], out[batch:])
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                d_sum += d_loss.detach().double()
                seg_d += 1
            z = torch.randn(gen_batch, z_dim, generator=train_rng).to(device)
            y_gen = torch.randint(0, NUM_CLASSES, (gen_batch,), generator=train_rng).to(device)
            g_loss = -disc(gen(z, y_gen), y_gen).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            g_sum += g_loss.detach().double()
            seg_g += 1
            if it in checkpoints:
                fd, acc, _ = _scores(gen, clf, eval_z, eval_y, real_stats)
                curve_fd.append(fd)
                curve_acc.append(acc)
                last_d, last_g = float(d_sum) / seg_d, float(g_sum) / seg_g
                curve_d.append(last_d)
                curve_g.append(last_g)
                d_sum.zero_()
                g_sum.zero_()
                seg_d = seg_g = 0
            if it % max(1, iterations // 100) == 0:
                progress(it / iterations)

        fd, acc, acc_per_class = _scores(gen, clf, eval_z, eval_y, real_stats)
        grid = _sample(gen, grid_z, grid_y).view(NUM_CLASSES, k, 8, 8)
        progress(1.0)
        return {
            "fd": fd,
            "cond_acc": acc,
            "fd_real": fd_real,
            "clf_test_acc": clf_acc,
            "final_d_loss": last_d,
            "final_g_loss": last_g,
            "cond_acc_per_class": acc_per_class,
            "curve_fd": curve_fd,
            "curve_cond_acc": curve_acc,
            "curve_d_loss": curve_d,
            "curve_g_loss": curve_g,
            "sample_grid": _encode_grid(grid),
        }

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        return _figures(results, Path(out_dir))


def _validate(cfg: dict[str, Any]) -> None:
    check_ints("gan", cfg, _INT_KEYS)
    check_numbers("gan", cfg, ("lr", "beta1", "beta2"), minimum=None)
    if cfg["lr"] <= 0:
        raise ConfigError(f"study gan: --lr: expected a learning rate > 0, got {cfg['lr']}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(
                f"study gan: {option_flag(key)}: expected a number in [0, 1), got {cfg[key]}"
            )
    if cfg["eval_per_class"] < 2:
        raise ConfigError(
            f"study gan: --eval-per-class: expected at least 2 (a covariance), got "
            f"{cfg['eval_per_class']}"
        )
    if cfg["batch_size"] > 1347:
        raise ConfigError(
            f"study gan: --batch-size: expected at most 1347 (the training images), got "
            f"{cfg['batch_size']}"
        )
    check_methods("gan", cfg, METHODS)


# --------------------------------------------------------------------------------------------
# Figures


def _figures(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = runs_by_method(results, METHODS)
    if not groups:
        return []
    methods = list(groups)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    n_seeds = max(len(v) for v in groups.values())
    paths: list[Path] = []

    # Samples: one panel per method, rows = conditioning class, from the first seed.
    grids = {}
    for m in methods:
        for seed, metrics in groups[m]:
            if isinstance(metrics.get("sample_grid"), Mapping):
                grids[m] = (seed, metrics, decode_grid(metrics["sample_grid"]))
                break
    if grids:
        fig = Figure(figsize=(3.4 * len(grids), 4.6), layout="constrained")
        axes = [fig.add_subplot(1, len(grids), i + 1) for i in range(len(grids))]
        for ax, (m, (seed, metrics, images)) in zip(axes, grids.items()):
            classes, per_class, h, w = images.shape
            # A blank pixel between digits, so that each one reads on its own.
            padded = F.pad(images, (0, 1, 0, 1))
            mosaic = padded.permute(0, 2, 1, 3).reshape(classes * (h + 1), per_class * (w + 1))
            ax.imshow(mosaic.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_yticks(
                [(h + 1) * k + (h - 1) / 2 for k in range(classes)],
                [str(k) for k in range(classes)],
            )
            ax.set_xticks([])
            ax.set_ylabel("conditioning class")
            ax.set_xlabel(f"{per_class} samples (same noise in every row)")
            fd, acc = metrics.get("fd"), metrics.get("cond_acc")
            score = (
                f"FD {fd:.2f}, acc {acc:.2f}"
                if isinstance(fd, (int, float)) and isinstance(acc, (int, float))
                else "scores not finite"
            )
            ax.set_title(f"{m} (seed {seed})\n{score}", fontsize="medium")
        fig.suptitle("Generated digits per class, eval mode")
        paths.append(out_dir / "gan_samples.png")
        fig.savefig(paths[-1], dpi=120)

    # Scores: FD (lower is better) and conditional accuracy, mean ± std and each seed.
    fig = Figure(figsize=(9.5, 4.2), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    panels = (
        ("fd", "fd_real", "Fréchet distance (lower is better)", "FD on classifier features"),
        (
            "cond_acc",
            "clf_test_acc",
            "Conditional accuracy (higher is better)",
            "classifier accuracy on samples",
        ),
    )
    for ax, (key, ref_key, title, ylabel) in zip(axes, panels):
        for i, m in enumerate(methods):
            values = [met.get(key) for _, met in groups[m]]
            mu, sd = mean_std(values)
            ax.bar(i, mu, 0.6, yerr=sd, capsize=4, color=colors[m], alpha=0.8, label=m)
            dots = finite_values(values)
            ax.plot([i] * len(dots), dots, "o", color="black", markersize=3)
        refs = finite_values([met.get(ref_key) for m in methods for _, met in groups[m]])
        if refs:
            ref = sum(refs) / len(refs)
            label = "real train vs held-out" if key == "fd" else "classifier on real held-out"
            ax.axhline(ref, color="gray", linestyle="--", label=label)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_xlabel("generator norm")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Conditional GAN on 8×8 digits: mean ± std over {n_seeds} seed(s), dots = seeds")
    paths.append(out_dir / "gan_scores.png")
    fig.savefig(paths[-1], dpi=120)

    # Curves: both scores during training.
    iterations = results.get("config", {}).get("iterations")
    fig = Figure(figsize=(9.5, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    drawn = False
    for ax, (key, ylabel) in zip(
        axes, (("curve_fd", "FD (lower is better)"), ("curve_cond_acc", "conditional accuracy"))
    ):
        for m in methods:
            curves = [met[key] for _, met in groups[m] if isinstance(met.get(key), list)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            if length == 0:
                continue
            stats = [mean_std([c[i] for c in curves]) for i in range(length)]
            if isinstance(iterations, int):
                xs = [max(1, round(iterations * (i + 1) / length)) for i in range(length)]
            else:
                xs = list(range(1, length + 1))
            means = [s[0] for s in stats]
            ax.errorbar(
                xs,
                means,
                yerr=[s[1] for s in stats],
                marker="o",
                capsize=3,
                color=colors[m],
                label=m,
            )
            drawn = True
        ax.set_xlabel("generator steps" if isinstance(iterations, int) else "evaluation point")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel + " during training", fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    if drawn:
        fig.suptitle(f"Scores during training (mean ± std over {n_seeds} seed(s))")
        paths.append(out_dir / "gan_curves.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


STUDY = GanStudy(
    name="gan",
    title="Sandwich BN in a class-conditional GAN on the 8×8 digits",
    paper="Gong et al., Sandwich Batch Normalization, arXiv 2102.11382 (WACV 2022)",
    claims=(
        Claim(
            text="SaBN gives a lower Fréchet distance than CCBN",
            better="sabn",
            worse="ccbn",
            metric="fd",
            higher_is_better=False,
        ),
        Claim(
            text="SaBN gives a higher conditional accuracy than CCBN",
            better="sabn",
            worse="ccbn",
            metric="cond_acc",
        ),
    ),
)
