"""SSBA (Li et al., ICCV 2021, "Invisible backdoor attack with sample-specific triggers"), with the encoder made here.

BackdoorBench v2.2 reads pre-encoded images (resource/ssba/*.npy) made by the authors' StegaStamp encoder; links
and scripts break (its issues #1, #3, #9, ...). This project trains a StegaStamp encoder/decoder on the dataset's
training images instead and caches it per dataset and settings (<record_root>/.cache/ssba/):

- encoder: StegaStamp's (BackdoorBench resource/ssba/models.py; ``SSBAEncoder``): the secret (100 bits, the original
  method's length) -> dense -> a 16x16 map, upsampled and concatenated with the IMAGE, then a U-Net on [secret map,
  image] whose sigmoid output is the encoded image (BackdoorBench's run: use_residual 0). The image enters before the
  secret is mixed in, so the residual (encoded - image) differs from image to image: a sample-specific trigger, not
  one additive pattern. Width ``ssba_width`` (StegaStamp: 32). Image sides must be multiples of 16.
- decoder (a departure: StegaStamp's is five stride-2 convs + two dense layers): a fixed 3x3 high-pass, amplified,
  then two convs -> linear -> bit logits; it trains in far fewer steps on a CPU.
- training as StegaStamp: random secrets per image, loss = BCE(bits) + ssba_image_weight * MSE(encoded - image)
  (StegaStamp's l2 weight 10), the encoded image quantized (uniform noise of one grey level) before decoding. Adam.
  Departures, for CPU budgets: lr ``ssba_lr`` with a cosine schedule over ``ssba_steps`` steps (StegaStamp: 1e-4,
  constant, 20 epochs), and the image term ramped in from 20% to 50% of the steps (StegaStamp: once bit accuracy
  passes 0.9, after 1,000 more steps, over 3,000 steps).
- the attack: one fixed secret (from ``ssba_secret_seed``); poisoned image = uint8(encoder(image, secret)), dirty
  label (all2one: target; as BackdoorBench), poisoned test set = every non-target test image encoded.
- measured on held-out images (the first ``ssba_heldout`` test images, never used to train the encoder): mean
  PSNR, the decoder's bit accuracy for the fixed secret, the largest |residual| and the mean pairwise cosine between
  the residuals of different images (1: one additive pattern; near 0: image-specific), written to info.pickle and
  ssba_encoder.yaml. A PSNR below ``ssba_min_psnr`` is an error (the trigger would not be invisible), and so is a
  cosine above ``ssba_max_cosine`` (default 1: only reported).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from bdsafety.attacks.base import Attack, register_attack
from bdsafety.attacks.resources import array_digest, cache_key, load_or_build
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, SEED, Option
from bdsafety.defenses.bti import model_digest
from bdsafety.errors import ConfigError, TrainingDiverged


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2), nn.ReLU())


class _Up(nn.Module):
    """StegaStamp's up step: nearest x2, zero pad right/bottom by 1, 2x2 conv, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))))


class SSBAEncoder(nn.Module):
    """StegaStamp's encoder (BackdoorBench resource/ssba/models.py, StegaStampEncoder): the secret -> dense (ReLU) ->
    a (C, 16, 16) map, nearest-upsampled to (H, W), concatenated with the IMAGE; a U-Net (channels w, w, 2w, 4w, 8w
    down with stride 2, back up with skips, the input concatenated again before the last convs) maps [secret map,
    image] to the encoded image (sigmoid; BackdoorBench's use_residual 0), so the residual depends on the image and the
    secret jointly. w = ``width`` (StegaStamp: 32)."""

    def __init__(self, img_size=(32, 32, 3), bits: int = 100, width: int = 32):
        super().__init__()
        h, w, c = img_size
        if h % 16 or w % 16:
            raise ConfigError(f"the SSBA (StegaStamp) encoder halves the image 4 times: {h}x{w} is not a multiple of "
                              f"16 (--img_size)")
        self.config = {"img_size": [int(h), int(w), int(c)], "bits": int(bits), "width": int(width)}
        self.shape, self.size = (c, 16, 16), (h, w)
        self.secret = nn.Linear(bits, c * 16 * 16)
        w1, w2, w4, w8 = width, 2 * width, 4 * width, 8 * width
        self.conv1, self.conv2 = _conv(2 * c, w1), _conv(w1, w1, stride=2)
        self.conv3, self.conv4, self.conv5 = _conv(w1, w2, stride=2), _conv(w2, w4, stride=2), _conv(w4, w8, stride=2)
        self.up6, self.conv6 = _Up(w8, w4), _conv(w4 + w4, w4)
        self.up7, self.conv7 = _Up(w4, w2), _conv(w2 + w2, w2)
        self.up8, self.conv8 = _Up(w2, w1), _conv(w1 + w1, w1)
        self.up9, self.conv9 = _Up(w1, w1), _conv(w1 + w1 + 2 * c, w1)
        self.conv10, self.out = _conv(w1, w1), nn.Conv2d(w1, c, 1)

    def forward(self, x01: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """The residual encoded - x01 (encoded in (0, 1)) that hides ``secret`` (n, bits in {0, 1}) in x01 in [0, 1]."""
        code = F.relu(self.secret(secret)).view(-1, *self.shape)
        inputs = torch.cat([F.interpolate(code, size=self.size, mode="nearest"), x01], 1)
        c1 = self.conv1(inputs)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c5 = self.conv5(c4)
        c6 = self.conv6(torch.cat([c4, self.up6(c5)], 1))
        c7 = self.conv7(torch.cat([c3, self.up7(c6)], 1))
        c8 = self.conv8(torch.cat([c2, self.up8(c7)], 1))
        c9 = self.conv9(torch.cat([c1, self.up9(c8), inputs], 1))
        return torch.sigmoid(self.out(self.conv10(c9))) - x01


class SSBADecoder(nn.Module):
    def __init__(self, img_size=(32, 32, 3), bits: int = 100, width: int = 32):
        super().__init__()
        h, w, c = img_size
        self.config = {"img_size": [int(h), int(w), int(c)], "bits": int(bits), "width": int(width)}
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(width * ((h + 1) // 2) * ((w + 1) // 2), bits))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        # a fixed local high-pass, amplified: the code is a few grey levels on top of the image, whose smooth content
        # would otherwise swamp it (without this the bit loss stays at log 2 for hundreds of steps)
        hp = x01 - F.avg_pool2d(x01, 3, stride=1, padding=1, count_include_pad=False)
        return self.net(hp * 32.0)


def fixed_secret(bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, bits).astype(np.float32)


def encode_uint8(encoder: SSBAEncoder, images: np.ndarray, secret: np.ndarray, device,
                 batch_size: int = 512) -> np.ndarray:
    """uint8 images with ``secret`` hidden: round(clip(image + residual)) (the poisoned images)."""
    out = np.empty_like(images)
    encoder.eval()
    sec = torch.as_tensor(secret, device=device).float()[None]
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.as_tensor(images[s:s + batch_size], device=device).permute(0, 3, 1, 2).float() / 255.0
            y = (x + encoder(x, sec.expand(len(x), -1))).clamp(0, 1)
            out[s:s + batch_size] = torch.round(y * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def mean_pairwise_cosine(res: np.ndarray) -> float:
    """Mean cosine similarity between the flattened residuals of different images (1: one additive pattern for all;
    about 0: unrelated, image-specific residuals)."""
    v = res.reshape(len(res), -1).astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    n = len(v)
    if n < 2:
        return float("nan")
    g = v @ v.T
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def decode_bits(decoder: SSBADecoder, images: np.ndarray, device, batch_size: int = 512) -> np.ndarray:
    decoder.eval()
    outs = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.as_tensor(images[s:s + batch_size], device=device).permute(0, 3, 1, 2).float() / 255.0
            outs.append((decoder(x) > 0).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, decoder.config["bits"]), np.float32)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 image batches (inf for identical images)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def train_encoder(train_x: np.ndarray, *, bits: int, width: int, steps: int, batch_size: int,
                  lr: float, image_weight: float, seed: int, device, log=print) -> tuple[SSBAEncoder, SSBADecoder]:
    """StegaStamp-style training on uint8 images with random secrets per image."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    img_size = train_x.shape[1:]
    enc = SSBAEncoder(img_size, bits, width).to(device)
    dec = SSBADecoder(img_size, bits, width).to(device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    enc.train(), dec.train()
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=g).numpy()
        x = torch.as_tensor(train_x[idx], device=device).permute(0, 3, 1, 2).float() / 255.0
        secret = torch.randint(0, 2, (batch_size, bits), generator=g).float().to(device)
        res = enc(x, secret)
        noise = (torch.rand(x.shape, generator=g) - 0.5).to(device) / 255.0  # stands in for uint8 rounding
        y = (x + res + noise).clamp(0, 1)
        logits = dec(y)
        bit_loss = F.binary_cross_entropy_with_logits(logits, secret)
        # the image term ramps in after the bits start to decode (as StegaStamp's l2 ramp): from 20% to 50% of training
        ramp = min(1.0, max(0.0, (step - 0.2 * steps) / (0.3 * steps)))
        loss = bit_loss + image_weight * ramp * res.pow(2).mean()
        if not torch.isfinite(loss):

            raise TrainingDiverged("SSBA encoder training: the loss became non-finite; lower ssba_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            acc = ((logits > 0).float() == secret).float().mean().item()
            log(f"ssba encoder step {step + 1}/{steps}: bit loss {bit_loss.item():.3f}, bit acc {acc:.3f}, "
                f"residual rms {res.pow(2).mean().sqrt().item() * 255:.2f}/255")
    return enc.eval(), dec.eval()


@register_attack
class SSBA(Attack):
    name = "ssba"
    description = ("SSBA attack: sample-specific invisible trigger from a StegaStamp-style encoder trained here, dirty "
                   "label (BackdoorBench-compatible record)")
    options = {
        "ssba_bits": Option(100, "secret length in bits (the original method's 100)", check=POS_INT),
        "ssba_secret_seed": Option(0, "seed of the fixed secret hidden in every poisoned image", check=SEED),
        "ssba_width": Option(32, "encoder/decoder width (channels of the first layer; StegaStamp: 32)", check=POS_INT),
        "ssba_steps": Option(3000, "encoder/decoder training steps", check=POS_INT),
        "ssba_batch_size": Option(64, "encoder/decoder training batch size", check=POS_INT),
        "ssba_lr": Option(3e-3, "encoder/decoder Adam learning rate (cosine schedule)", check=POSITIVE),
        "ssba_image_weight": Option(10.0, "weight of the residual's MSE against the bit loss (StegaStamp's l2 weight)",
                                    check=NONNEG),
        "ssba_seed": Option(0, "seed of the encoder training (the encoder is cached per dataset and settings, not per "
                               "attack seed)", check=SEED),
        "ssba_heldout": Option(500, "held-out test images on which PSNR and bit accuracy are measured", check=POS_INT),
        "ssba_min_psnr": Option(27.0, "refuse an encoder whose mean PSNR on held-out images is lower (dB)",
                                check=POSITIVE),
        "ssba_min_bit_acc": Option(0.0, "refuse an encoder whose held-out bit accuracy is lower (0: only reported)",
                                   check=NONNEG),
        "ssba_max_cosine": Option(1.0, "refuse an encoder whose held-out residuals have a higher mean pairwise cosine "
                                       "(near 1: one additive pattern, not sample-specific; 1: only reported)",
                                  check=FRACTION),
    }

    def prepare(self) -> None:
        c, d = self.cfg, self.ctx.data
        settings = {k: getattr(c, k) for k in ("ssba_bits", "ssba_width", "ssba_steps", "ssba_batch_size", "ssba_lr",
                                                 "ssba_image_weight", "ssba_seed")}
        meta = {"format": 2, "encoder": "stegastamp_unet", "dataset": c.dataset, "data": array_digest(d.train_x),
                **settings}
        path = self.ctx.cache_dir / "ssba" / f"{c.dataset}_{cache_key(meta)}.pt"
        img_size = tuple(int(s) for s in d.train_x.shape[1:])

        def build():
            self.ctx.log(f"training the SSBA encoder/decoder on {len(d.train_x)} training images "
                         f"({c.ssba_steps} steps)")
            enc, dec = train_encoder(d.train_x, bits=c.ssba_bits, width=c.ssba_width, steps=c.ssba_steps,
                                     batch_size=c.ssba_batch_size, lr=c.ssba_lr, image_weight=c.ssba_image_weight,
                                     seed=c.ssba_seed, device=self.ctx.device, log=self.ctx.log)
            return {"encoder": {k: v.cpu() for k, v in enc.state_dict().items()},
                    "decoder": {k: v.cpu() for k, v in dec.state_dict().items()}}

        obj = load_or_build(path, meta, build, self.ctx.log, "ssba encoder", check=lambda o: self._load(o, img_size))
        self._load(obj, img_size)
        self.cache_file = str(path)

        self.digest = model_digest(self.encoder)
        held = d.test_x[: c.ssba_heldout]
        self.secret = fixed_secret(c.ssba_bits, c.ssba_secret_seed)
        enc_held = encode_uint8(self.encoder, held, self.secret, self.ctx.device)
        psnr = psnr_uint8(held, enc_held)
        self.psnr = float(np.mean(np.minimum(psnr, 100.0)))
        self.bit_acc = float((decode_bits(self.decoder, enc_held, self.ctx.device) == self.secret[None]).mean())
        res = enc_held.astype(np.float64) - held.astype(np.float64)
        self.linf = int(np.abs(res).max()) if len(held) else 0
        self.cosine = mean_pairwise_cosine(res)
        self.ctx.log(f"ssba encoder on {len(held)} held-out test images: PSNR {self.psnr:.2f} dB, bit accuracy "
                     f"{self.bit_acc:.4f}, max |residual| {self.linf}/255, mean pairwise cosine of the residuals "
                     f"{self.cosine:.3f}")
        if self.psnr < c.ssba_min_psnr:
            raise ConfigError(f"the SSBA encoder's PSNR {self.psnr:.2f} dB is below ssba_min_psnr {c.ssba_min_psnr}: "
                              f"the trigger would be visible; raise ssba_image_weight or train longer (ssba_steps)")
        if self.bit_acc < c.ssba_min_bit_acc:
            raise ConfigError(f"the SSBA encoder's held-out bit accuracy {self.bit_acc:.4f} is below ssba_min_bit_acc "
                              f"{c.ssba_min_bit_acc}; train it longer (ssba_steps) or lower ssba_image_weight")
        if self.cosine > c.ssba_max_cosine:
            raise ConfigError(f"the SSBA encoder's residuals have mean pairwise cosine {self.cosine:.3f} > "
                              f"ssba_max_cosine {c.ssba_max_cosine}: a near-universal pattern, not a sample-specific "
                              f"trigger")

    def _load(self, obj: dict, img_size: tuple) -> None:
        c = self.cfg
        enc = SSBAEncoder(img_size, c.ssba_bits, c.ssba_width)
        dec = SSBADecoder(img_size, c.ssba_bits, c.ssba_width)
        enc.load_state_dict(obj["encoder"], strict=True)
        dec.load_state_dict(obj["decoder"], strict=True)
        self.encoder, self.decoder = enc.to(self.ctx.device).eval(), dec.to(self.ctx.device).eval()

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return encode_uint8(self.encoder, images, self.secret, self.ctx.device)

    def info(self) -> dict:
        c = self.cfg
        return {"ssba_bits": c.ssba_bits, "ssba_secret": [int(b) for b in self.secret], "ssba_psnr": self.psnr,
                "ssba_bit_acc": self.bit_acc, "ssba_linf": self.linf, "ssba_residual_cosine": self.cosine,
                "ssba_heldout": int(min(c.ssba_heldout, len(self.ctx.data.test_x))), "ssba_encoder": "stegastamp_unet",
                "ssba_encoder_cache": self.cache_file, "ssba_encoder_digest": self.digest}

    def artifacts(self) -> dict:

        doc = {"encoder": "StegaStamp U-Net on [secret map, image]", "width": self.cfg.ssba_width,
               "psnr_db": round(self.psnr, 3), "bit_accuracy": round(self.bit_acc, 5), "max_abs_residual": self.linf,
               "residual_mean_pairwise_cosine": round(self.cosine, 4),
               "heldout_test_images": self.info()["ssba_heldout"],
               "weights_sha256": self.digest, "cache": self.cache_file}
        return {"ssba_encoder.yaml": yaml.safe_dump(doc, sort_keys=False)}
