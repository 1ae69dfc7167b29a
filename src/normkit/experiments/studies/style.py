"""The ``style`` study (Gong et al., Sandwich Batch Normalization, arXiv 2102.11382, §NST).

The paper's claim: in AdaIN style transfer (Huang & Belongie 2017), putting a shared learnable
affine between the instance normalization of the content features and the style's statistics
(SaAdaIN) gives lower style and content losses than plain AdaIN, in training and on validation
(reported as curves only).

Setup (the official ``NST/`` code, scaled to 8×8 digits):

* **Images.** Content images are the digits of :func:`normkit.experiments.data.digits_split`
  as 3-channel grey images. Style images are digits rendered in one of ``num_styles`` fixed
  *styles* (:func:`style_bank`, drawn from a generator seeded by ``data_seed``, the same for every
  run), as the ``domains`` study builds domains from fixed transforms: style ``k`` paints the
  background in a colour ``bg_k``, the strokes in a colour ``fg_k`` and adds a coloured sinusoidal
  texture ``a_k · sin(2π(f_k · position) + φ_k + 2πc/3)`` on channel ``c``
  (:func:`apply_style`). Training pairs a content batch of training digits with a batch of other
  training digits in random styles (both drawn by the run's seed); the *held-out pairs* are
  ``val_pairs`` fixed pairs of test digits (content) and test digits in a style (style).
* **Encoder.** No pretrained network can be downloaded, so the VGG of the paper is replaced by a
  small encoder **trained within each run on the study's own images** (:func:`train_encoder`):
  three reflection-padded 3×3 conv + ReLU layers (``enc1`` 3→16 at 8×8; 2×2 max pooling; ``enc2``
  16→32 and ``enc3`` 32→32 at 4×4), trained for ``encoder_epochs`` with Adam to recognise both
  the digit (10 classes) and the style (``num_styles`` + 1 for the plain content images) of every
  training image, plain and in every style. The two linear heads follow AdaIN's premise: the digit
  head reads the instance-normalized ``enc3`` map (the spatial pattern), the style head its
  per-channel means and standard deviations. Its features therefore carry both the content and
  the style, as VGG's do. It is then frozen; its training depends on the seed only, so both
  methods of a seed share it.
* **Transfer network** (``BaseStyleNet`` of the official code): ``t = norm(enc3(c), enc3(s))``;
  the decoder (3×3 conv 32→32, ReLU, ×2 nearest upsampling, 3×3 conv 32→16, ReLU, 3×3 conv 16→3,
  reflection padding) maps ``t`` back to an image ``g(t)``. ``norm`` is ``adain``
  (:class:`normkit.SandwichAdaIN` with ``affine=False``: plain AdaIN) or ``saadain``
  (:class:`normkit.SandwichAdaIN`: instance norm, then the shared affine initialised to 1 and 0,
  then the style's std and mean). Both use the unbiased variance plus 1e-5, as the official code.
* **Losses** (the official ``calc_content_loss`` and ``calc_style_loss``):
  content ``L_c = MSE(enc3(g(t)), t)``; style ``L_s = Σ_{l ∈ enc1..enc3} MSE(μ_l(g(t)), μ_l(s)) +
  MSE(σ_l(g(t)), σ_l(s))``, with per-(sample, channel) spatial mean and std
  (``sqrt(unbiased var + 1e-5)``). As in the official code, the content target ``t`` is not
  detached, so for SaAdaIN it includes the shared affine that is being learnt.
* **Training**: ``steps`` Adam steps (lr ``lr``; the official code's tiny inverse-time decay is
  left out) on ``content_weight · L_c + style_weight · L_s`` (1 and 10, the official weights), on
  batches of ``batch_size`` pairs; the decoder and, for SaAdaIN, the shared affine are trained
  (the official optimiser's parameters). The decoder's initialization depends on the seed only,
  and the batches are the same for both methods (paired seeds).

Metrics of a run (:meth:`StyleStudy.run`), all on the held-out pairs unless named ``train``:
``val_content_loss`` and ``val_style_loss`` (unweighted, at the end; the claims' metrics), the
curves ``curve_val_content`` and ``curve_val_style`` (at step 0 and every ``eval_every`` steps),
``curve_train_content`` and ``curve_train_style`` (mean training losses over each interval),
and three diagnostics that keep the comparison honest: ``val_content_loss_adain_target`` (the
content loss against the plain AdaIN target, the same for both methods: SaAdaIN's own target
moves with its shared affine), ``content_acc`` (how often the encoder's digit head reads the
content's digit in the output) and ``style_acc`` (how often its style head reads the style's
style); for SaAdaIN ``shared_weight_mean`` and ``shared_bias_mean`` too. ``examples`` holds the
first ``n_examples`` held-out pairs and their transfers, for the figure.

Claims: SaAdaIN reaches a lower held-out style loss, and a lower held-out content loss, than
AdaIN (one-sided paired t-tests over the seeds, lower is better).

What to expect (measured at ``--quick``, 2 seeds): both methods drive the losses down from about
6 to about 0.4–0.5 within 200 steps and stay within a few percent of each other; the decoder
learns to reproduce the styles' colour statistics (``style_acc`` high) but not yet the digits'
shapes (``content_acc`` near chance, 10 %): at these sizes the transfers are flat colour fields.

Time, measured through the runner (2 jobs of 1 thread) on 2 CPU cores shared with other jobs
(load 6–7): ``--quick`` (2 methods × 2 seeds, 200 steps) took 166 s wall but only 33 s of CPU for
its runs (about 20 s on 2 idle cores); a default run (600 steps) uses about 15–20 s of CPU, so
the default study (2 methods × 10 seeds) needs about 350 s of CPU, about 3 min on 2 idle cores
(an estimate from single runs, not a measured end-to-end default run).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normkit as nk
from normkit.experiments import data, stats
from normkit.experiments.stats import finite_values
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
    metrics_by_method,
)

__all__ = [
    "METHODS",
    "STUDY",
    "Encoder",
    "StyleStudy",
    "apply_style",
    "content_loss",
    "mean_std",
    "style_bank",
    "style_loss",
    "train_encoder",
]

#: The study's methods.
METHODS: tuple[str, ...] = ("adain", "saadain")

#: The study has one setting.
SETTING = "digits"

#: Channels of the encoder's layers (``enc1``, ``enc2``, ``enc3``).
ENC_CHANNELS: tuple[int, int, int] = (16, 32, 32)

EPS = 1e-5

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "num_styles": 6,
    "encoder_epochs": 4,
    "steps": 600,
    "batch_size": 16,
    "lr": 0.003,
    "content_weight": 1.0,
    "style_weight": 10.0,
    "eval_every": 50,
    "val_pairs": 450,
    "n_examples": 6,
    "data_seed": 0,
    "seeds": 10,
}
_QUICK: dict[str, Any] = {"encoder_epochs": 2, "steps": 200, "eval_every": 40, "seeds": 2}


# --------------------------------------------------------------------------------------------
# Styles


@functools.lru_cache(maxsize=8)
def style_bank(data_seed: int, num_styles: int) -> dict[str, Tensor]:
    """The fixed styles: ``fg``, ``bg`` (``(K, 3)`` colours in [0, 1]) and ``texture``
    (``(K, 3, 8, 8)``), drawn from a generator seeded with ``data_seed``."""
    g = torch.Generator().manual_seed(10_007 + data_seed)
    k = num_styles
    fg = torch.rand(k, 3, generator=g)
    bg = torch.rand(k, 3, generator=g)
    freq = torch.randint(0, 3, (k, 2), generator=g).float() + torch.tensor([1.0, 0.0])
    phase = 2 * math.pi * torch.rand(k, generator=g)
    amp = 0.1 + 0.25 * torch.rand(k, generator=g)
    pos = torch.arange(8, dtype=torch.float32)
    grid = freq[:, 0, None, None] * pos[:, None] + freq[:, 1, None, None] * pos[None, :]  # (K,8,8)
    shift = 2 * math.pi * torch.arange(3, dtype=torch.float32) / 3
    arg = 2 * math.pi * grid[:, None] / 8 + phase[:, None, None, None] + shift[None, :, None, None]
    texture = amp[:, None, None, None] * torch.sin(arg)
    return {"fg": fg, "bg": bg, "texture": texture}


def apply_style(x: Tensor, style: Tensor, bank: Mapping[str, Tensor]) -> Tensor:
    """Digits ``x`` (``(N, 1, 8, 8)`` in [0, 1]) in the styles ``style`` (``(N,)`` indices):
    ``bg + (fg − bg) · x + texture``, 3 channels."""
    fg = bank["fg"][style][:, :, None, None]
    bg = bank["bg"][style][:, :, None, None]
    return bg + (fg - bg) * x + bank["texture"][style]


def _grey(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1).contiguous()


@functools.lru_cache(maxsize=4)
def _val_pairs(data_seed: int, num_styles: int, n: int) -> tuple[Tensor, ...]:
    """The held-out pairs: content indices, style-image indices and styles, into the test set."""
    g = torch.Generator().manual_seed(20_011 + data_seed)
    content = torch.randperm(data.TEST_SIZE, generator=g)[:n]
    other = torch.randperm(data.TEST_SIZE, generator=g)[:n]
    styles = torch.randint(0, num_styles, (n,), generator=g)
    return content, other, styles


# --------------------------------------------------------------------------------------------
# Losses


def mean_std(feat: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) spatial mean and ``sqrt(unbiased variance + eps)`` of a
    ``(N, C, H, W)`` feature map, each ``(N, C)`` (the official ``calc_mean_std``)."""
    flat = feat.flatten(2)
    return flat.mean(dim=2), (flat.var(dim=2) + eps).sqrt()


def content_loss(output_feat: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between the output's last features and the target ``t``."""
    return F.mse_loss(output_feat, target)


def style_loss(output_feats: Sequence[Tensor], style_feats: Sequence[Tensor]) -> Tensor:
    """``Σ_l MSE(μ_l(out), μ_l(style)) + MSE(σ_l(out), σ_l(style))`` over the layers."""
    total = torch.zeros((), device=output_feats[0].device)
    for o, s in zip(output_feats, style_feats, strict=True):
        om, osd = mean_std(o)
        sm, ssd = mean_std(s)
        total = total + F.mse_loss(om, sm) + F.mse_loss(osd, ssd)
    return total


# --------------------------------------------------------------------------------------------
# Networks


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 3))


class Encoder(nn.Module):
    """Three conv + ReLU layers (8×8, then 4×4) and the two heads that train them.

    The heads follow AdaIN's premise, that content is the normalized spatial pattern of the
    features and style their per-channel statistics: the digit head reads the instance-normalized
    ``enc3`` map (flattened), the style head its per-channel means and standard deviations.
    """

    def __init__(self, num_styles: int) -> None:
        super().__init__()
        c1, c2, c3 = ENC_CHANNELS
        self.enc1 = nn.Sequential(_conv(3, c1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), _conv(c1, c2), nn.ReLU())
        self.enc3 = nn.Sequential(_conv(c2, c3), nn.ReLU())
        self.digit_head = nn.Linear(c3 * 16, data.NUM_CLASSES)
        self.style_head = nn.Linear(2 * c3, num_styles + 1)

    def features(self, x: Tensor) -> list[Tensor]:
        """``[enc1(x), enc2(...), enc3(...)]``, the layers of the style loss."""
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        return [f1, f2, self.enc3(f2)]

    def heads(self, f3: Tensor) -> tuple[Tensor, Tensor]:
        """Digit and style logits from ``enc3`` features."""
        mean, std = mean_std(f3)
        normalized = (f3 - mean[:, :, None, None]) / std[:, :, None, None]
        return self.digit_head(normalized.flatten(1)), self.style_head(torch.cat([mean, std], 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.features(x)[-1])


def _decoder() -> nn.Sequential:
    c1, c2, c3 = ENC_CHANNELS
    return nn.Sequential(
        _conv(c3, c2),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        _conv(c2, c1),
        nn.ReLU(),
        _conv(c1, 3),
    )


def _encoder_data(data_seed: int, num_styles: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every training digit, plain (style label 0) and in every style (labels 1..K)."""
    digits = data.digits_split()
    bank = style_bank(data_seed, num_styles)
    n = len(digits.y_train)
    xs, ss = [_grey(digits.x_train)], [torch.zeros(n, dtype=torch.long)]
    for k in range(num_styles):
        style = torch.full((n,), k, dtype=torch.long)
        xs.append(apply_style(digits.x_train, style, bank))
        ss.append(style + 1)
    return torch.cat(xs), digits.y_train.repeat(num_styles + 1), torch.cat(ss)


@functools.lru_cache(maxsize=2)
def _trained_encoder_state(
    seed: int, data_seed: int, num_styles: int, epochs: int
) -> dict[str, Tensor]:
    x, y, s = _encoder_data(data_seed, num_styles)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(50_021 + seed)
        enc = Encoder(num_styles)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    batch = 128
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), batch):
            idx = perm[start : start + batch]
            digit_logits, style_logits = enc(x[idx])
            loss = F.cross_entropy(digit_logits, y[idx]) + F.cross_entropy(style_logits, s[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def train_encoder(seed: int, data_seed: int, num_styles: int, epochs: int) -> Encoder:
    """The frozen encoder of a seed, trained on the study's images (see the module docstring);
    cached in the process, so that the runs of a seed train it once."""
    enc = Encoder(num_styles)
    enc.load_state_dict(_trained_encoder_state(seed, data_seed, num_styles, epochs))
    enc.requires_grad_(False)
    return enc.eval()


class _TransferNet(nn.Module):
    def __init__(self, encoder: Encoder, norm: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = _decoder()
        self.norm = norm

    def transfer(self, content: Tensor, style_feat: Tensor) -> tuple[Tensor, Tensor]:
        """``(t, g(t))`` for content images and the style's ``enc3`` features."""
        t = self.norm(self.encoder.features(content)[-1], style_feat)
        return t, self.decoder(t)

    def losses(self, content: Tensor, style: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L_c, L_s, g(t))``."""
        style_feats = self.encoder.features(style)
        t, out = self.transfer(content, style_feats[-1])
        out_feats = self.encoder.features(out)
        return content_loss(out_feats[-1], t), style_loss(out_feats, style_feats), out


def _build(method: str, encoder: Encoder, seed: int) -> _TransferNet:
    if method not in METHODS:
        raise ValueError(f"style: unknown method {method!r}; known: {', '.join(METHODS)}")
    channels = ENC_CHANNELS[-1]
    norm = nk.SandwichAdaIN(channels, eps=EPS, affine=method == "saadain")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _TransferNet(encoder, norm)


# --------------------------------------------------------------------------------------------
# The study


class StyleStudy(Study):
    """AdaIN against SaAdaIN in a small encoder–decoder style transfer on styled digits.

    ``figures(results, out_dir)`` writes ``style_losses.png`` (held-out content and style losses
    over training, mean ± std over seeds, with the training losses dashed), ``style_final.png``
    (the final held-out losses, mean ± std and one dot per seed) and ``style_examples.png``
    (held-out pairs: content, style, and the transfers of each method at the first seed).
    """

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The sizes: ``methods`` (both), ``num_styles`` (6), ``encoder_epochs`` (4; 2 quick),
        ``steps`` (600; 200 quick), ``batch_size`` (16), ``lr`` (0.003), ``content_weight`` (1),
        ``style_weight`` (10), ``eval_every`` (50; 40 quick), ``val_pairs`` (450),
        ``n_examples`` (6), ``data_seed`` (0) and ``seeds`` (10; 2 quick).

        An override of ``None`` keeps the default. Raises :class:`ConfigError` naming the option.
        """
        cfg = merge_config("style", _DEFAULTS, _QUICK, quick, overrides)
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, SETTING, int(s)) for m in config["methods"] for s in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Train the encoder of the seed (or reuse it), then one method's decoder; evaluate on
        the held-out pairs. Deterministic for a given run, config and intra-op thread count."""
        device = torch.device(config.get("device", "cpu"))
        num_styles, data_seed = int(config["num_styles"]), int(config["data_seed"])
        progress(0.0)
        encoder = train_encoder(run.seed, data_seed, num_styles, int(config["encoder_epochs"]))
        net = _build(run.method, encoder, run.seed).to(device)
        net.decoder.train()
        bank = {k: v.to(device) for k, v in style_bank(data_seed, num_styles).items()}
        digits = data.digits_split().to(device)
        x_tr, y_tr = digits.x_train, digits.y_train
        x_te, y_te = digits.x_test, digits.y_test

        # Held-out pairs.
        vc, vs, vk = (
            t.to(device) for t in _val_pairs(data_seed, num_styles, int(config["val_pairs"]))
        )
        val_content = _grey(x_te[vc])
        val_style = apply_style(x_te[vs], vk, bank)

        params = list(net.decoder.parameters()) + list(net.norm.parameters())
        opt = torch.optim.Adam(params, lr=float(config["lr"]))
        wc, ws = float(config["content_weight"]), float(config["style_weight"])
        steps, batch, every = (
            int(config["steps"]),
            int(config["batch_size"]),
            int(config["eval_every"]),
        )
        draws = torch.Generator().manual_seed(run.seed)

        def evaluate() -> tuple[float, float]:
            with torch.no_grad():
                lc, ls, _ = net.losses(val_content, val_style)
            return float(lc), float(ls)

        curve_vc, curve_vs = [], []
        curve_tc: list[float] = []
        curve_ts: list[float] = []
        lc0, ls0 = evaluate()
        curve_vc.append(lc0)
        curve_vs.append(ls0)
        sum_c = torch.zeros((), device=device, dtype=torch.float64)
        sum_s = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for step in range(1, steps + 1):
            ci = torch.randint(0, len(y_tr), (batch,), generator=draws).to(device)
            si = torch.randint(0, len(y_tr), (batch,), generator=draws).to(device)
            sk = torch.randint(0, num_styles, (batch,), generator=draws).to(device)
            lc, ls, _ = net.losses(_grey(x_tr[ci]), apply_style(x_tr[si], sk, bank))
            loss = wc * lc + ws * ls
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sum_c += lc.detach().double()
            sum_s += ls.detach().double()
            count += 1
            if step % every == 0 or step == steps:
                curve_tc.append(float(sum_c) / count)
                curve_ts.append(float(sum_s) / count)
                sum_c.zero_()
                sum_s.zero_()
                count = 0
                lcv, lsv = evaluate()
                curve_vc.append(lcv)
                curve_vs.append(lsv)
                progress(step / steps)

        with torch.no_grad():
            style_feats = encoder.features(val_style)
            content_feat = encoder.features(val_content)[-1]
            _, out = net.transfer(val_content, style_feats[-1])
            adain_t = nk.SandwichAdaIN(ENC_CHANNELS[-1], eps=EPS, affine=False)(
                content_feat, style_feats[-1]
            )
            out_feats = encoder.features(out)
            fixed = float(content_loss(out_feats[-1], adain_t))
            digit_logits, style_logits = encoder(out)
            content_acc = float((digit_logits.argmax(1) == y_te[vc]).float().mean())
            style_acc = float((style_logits.argmax(1) == vk + 1).float().mean())
        progress(1.0)
        n_ex = min(int(config["n_examples"]), len(vc))
        metrics: Metrics = {
            "val_content_loss": curve_vc[-1],
            "val_style_loss": curve_vs[-1],
            "val_total_loss": wc * curve_vc[-1] + ws * curve_vs[-1],
            "val_content_loss_adain_target": fixed,
            "content_acc": content_acc,
            "style_acc": style_acc,
        }
        weight, bias = getattr(net.norm, "weight", None), getattr(net.norm, "bias", None)
        if isinstance(weight, Tensor) and isinstance(bias, Tensor):
            metrics["shared_weight_mean"] = float(weight.detach().mean())
            metrics["shared_bias_mean"] = float(bias.detach().mean())
        metrics.update(
            {
                "curve_val_content": curve_vc,
                "curve_val_style": curve_vs,
                "curve_train_content": curve_tc,
                "curve_train_style": curve_ts,
                "eval_steps": {"steps": _eval_steps(steps, every)},
                "examples": {
                    "content": _image_lists(val_content[:n_ex]),
                    "style": _image_lists(val_style[:n_ex]),
                    "output": _image_lists(out[:n_ex]),
                },
            }
        )
        return metrics

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        return _figures(results, Path(out_dir))


def _eval_steps(steps: int, every: int) -> list[int]:
    """The training steps at which the held-out losses are measured (0 first)."""
    return [0, *(s for s in range(1, steps + 1) if s % every == 0 or s == steps)]


def _image_lists(images: Tensor) -> list[Any]:
    """Images as nested lists rounded to 4 decimals (JSON-friendly, not a curve)."""
    return [[[[round(float(v), 4) for v in row] for row in ch] for ch in img] for img in images]


# --------------------------------------------------------------------------------------------
# Options


def _validate(cfg: dict[str, Any]) -> None:
    check_ints(
        "style",
        cfg,
        (
            "num_styles",
            "encoder_epochs",
            "steps",
            "batch_size",
            "eval_every",
            "val_pairs",
            "seeds",
        ),
    )
    check_ints("style", cfg, ("n_examples", "data_seed"), minimum=0)
    check_numbers("style", cfg, ("lr", "content_weight", "style_weight"))
    if cfg["lr"] == 0:
        raise ConfigError("--lr: expected a learning rate > 0, got 0")
    if cfg["val_pairs"] > data.TEST_SIZE:
        raise ConfigError(
            f"--val-pairs: expected at most {data.TEST_SIZE} (the test images), "
            f"got {cfg['val_pairs']}"
        )
    if cfg["batch_size"] < 2:
        raise ConfigError(f"--batch-size: expected at least 2, got {cfg['batch_size']}")
    check_methods("style", cfg, METHODS)


# --------------------------------------------------------------------------------------------
# Figures


def _figures(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from normkit.experiments import report

    groups = metrics_by_method(results, METHODS)
    if not groups:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(groups)
    n_seeds = max(len(v) for v in groups.values())
    color = {m: f"C{i}" for i, m in enumerate(methods)}
    names = {"adain": "AdaIN", "saadain": "SaAdaIN"}
    paths: list[Path] = []

    # Loss curves: held-out (solid, error bars) and training (dashed).
    fig, axes = report.new_figure(2, width=5.2, height=4.2)
    for ax, (kind, val_key, train_key) in zip(
        axes,
        (
            ("content", "curve_val_content", "curve_train_content"),
            ("style", "curve_val_style", "curve_train_style"),
        ),
    ):
        for m in methods:
            runs = [r for r in groups[m] if isinstance(r.get(val_key), list) and r[val_key]]
            if not runs:
                continue
            steps = (runs[0].get("eval_steps") or {}).get("steps") or list(
                range(len(runs[0][val_key]))
            )
            for key, style, label in (
                (val_key, "-", f"{names.get(m, m)}, held-out pairs"),
                (train_key, "--", f"{names.get(m, m)}, training batches"),
            ):
                curves = [r[key] for r in runs if isinstance(r.get(key), list) and r[key]]
                if not curves:
                    continue
                agg = stats.aggregate_curves(curves)
                xs = steps if key == val_key else steps[1:]
                pts = [
                    (x, mu, sd or 0.0)
                    for x, mu, sd in zip(xs, agg["mean"], agg["std"])
                    if mu is not None
                ]
                if not pts:
                    continue
                px, pm, ps = zip(*pts)
                if key == val_key:
                    ax.errorbar(
                        px,
                        pm,
                        yerr=ps,
                        fmt="o-",
                        markersize=3,
                        capsize=2,
                        color=color[m],
                        label=label,
                    )
                else:
                    ax.plot(px, pm, style, color=color[m], alpha=0.6, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{kind} loss (log scale)")
        ax.set_title(f"{kind.capitalize()} loss over training (mean ± std, {n_seeds} seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    paths.append(report.save_figure(fig, out_dir / "style_losses.png"))

    # Final held-out losses.
    fig, axes = report.new_figure(2, width=4.0, height=4.0)
    for ax, (key, label) in zip(
        axes, (("val_content_loss", "content loss"), ("val_style_loss", "style loss"))
    ):
        for i, m in enumerate(methods):
            vals = finite_values([r.get(key) for r in groups[m]])
            agg = stats.aggregate(vals)
            mu = agg["mean"] if agg["mean"] is not None else math.nan
            ax.bar(
                i,
                mu,
                0.6,
                yerr=agg["std"] or 0.0,
                capsize=4,
                color=color[m],
                alpha=0.8,
                label=names.get(m, m),
            )
            ax.plot([i] * len(vals), vals, "o", color="black", markersize=3)
        ax.set_xticks(range(len(methods)), [names.get(m, m) for m in methods])
        ax.set_xlabel("style normalization")
        ax.set_ylabel(f"held-out {label}")
        ax.set_title(
            f"Final held-out {label}\n(mean ± std and each of {n_seeds} seeds)", fontsize="medium"
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    paths.append(report.save_figure(fig, out_dir / "style_final.png"))

    # Example transfers at the first seed.
    first = {m: groups[m][0].get("examples") for m in methods}
    ref = next((e for e in first.values() if isinstance(e, Mapping) and e.get("content")), None)
    if ref is not None:
        rows = [("content", ref["content"]), ("style", ref["style"])]
        rows += [
            (f"{names.get(m, m)} output", e["output"])
            for m, e in first.items()
            if isinstance(e, Mapping) and e.get("output")
        ]
        n = len(ref["content"])
        fig = report.new_figure(1, width=1.3 * n + 1.5, height=1.3 * len(rows) + 0.8)[0]
        fig.clear()
        grid = fig.subplots(len(rows), n, squeeze=False)
        for r, (label, images) in enumerate(rows):
            for c in range(n):
                ax = grid[r][c]
                img = torch.tensor(images[c]).clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(label, fontsize="small")
                if r == 0:
                    ax.set_title(f"pair {c + 1}", fontsize="small")
        fig.suptitle("Held-out style transfers (first seed; colours clipped to [0, 1])")
        paths.append(report.save_figure(fig, out_dir / "style_examples.png"))
    return paths


STUDY = StyleStudy(
    name="style",
    title="Sandwich AdaIN against AdaIN in style transfer on digits",
    paper="Gong et al., Sandwich Batch Normalization, arXiv 2102.11382 (WACV 2022)",
    claims=(
        Claim(
            text="SaAdaIN reaches a lower style loss than AdaIN on held-out pairs",
            better="saadain",
            worse="adain",
            metric="val_style_loss",
            higher_is_better=False,
        ),
        Claim(
            text="SaAdaIN reaches a lower content loss than AdaIN on held-out pairs",
            better="saadain",
            worse="adain",
            metric="val_content_loss",
            higher_is_better=False,
        ),
    ),
)
