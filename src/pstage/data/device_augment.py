"""Augmentation on the device: the presets (presets.py) as a few batch operations after the transfer.

The loader then only slices the uint8 cache into (pinned) batches; flips, affine warps, colour,
blur/noise and erasing run here, each image with its own parameters, on whatever device the
batch is on (augment.device).

Hand-written because no library fuses a preset: per-transform batch libraries (kornia) run each
transform as its own module with per-call parameter generation and checks, dozens of small ops per
preset, and their host-side cost bounds a GPU step. Here every per-image parameter is drawn at once on the host
(torch's CPU generator, which Lightning seeds per fold: runs repeat) and the preset becomes one
warp (flip + scale/shift/rotate folded into one sampling grid), one 3x3 colour map per image
(brightness/contrast and grey folded together, the normalisation too), the HSV shift on the
images that draw it, one grouped convolution for the blurred images, noise for the noisy ones
and one erasing mask. Which images get which op is known on the host, and the parameters travel
in one pinned, non-blocking copy: no host synchronisation per step on a GPU.

Each op draws and acts as its albumentations counterpart in ``augment.py`` (the semantics are
albumentations', see presets.py; tests/test_augment_parity.py compares the two op by op). Float
throughout: no rounding to uint8 between ops, and the only clip before the end is before the HSV
shift (it needs values in range). What this costs against the loader path:
benchmarks/RESULTS.md#augmentation-backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pstage.config import AugmentConfig
from pstage.data.augment import on_device
from pstage.data.presets import PRESETS, BlurOrNoise, Preset

_LUMA = np.array([0.299, 0.587, 0.114])  # OpenCV's RGB -> grey weights
_GREY = np.outer(np.ones(3), _LUMA)  # (3, 3): luma in every channel

_HEXCONE = [[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]]  # per channel R, G, B: centre, sign, offset


class DeviceAugment(nn.Module):
    """The preset as a batch op: uint8 NHWC images in, the model's normalised float NCHW input out.

    Normalisation is folded into the colour map (warp, colour and blur are linear per channel, so
    their order does not matter) and the clamp to the valid range happens in normalised units:
    few passes over the batch (float, warp, colour + normalise, noise, clamp, erase), which is
    most of the cost on a CPU.
    """

    def __init__(self, preset: str | Preset):
        super().__init__()
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        # constants of the HSV shift as a buffer: they move with the module, no host copy per step
        self.register_buffer("hexcone", torch.tensor(_HEXCONE).view(3, 1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``mean``/``std``: (1, 3, 1, 1) in 0-255 units, as the classifier's normalisation."""
        n, h, w, _ = images.shape
        # one (N, K) draw from torch's seeded CPU generator; each op reads its own columns
        draw = Draw.sample(self.preset, torch.rand(n, width(self.preset), dtype=torch.float64).numpy(), h, w)
        d = draw.on(images.device)
        with torch.autocast(images.device.type, enabled=False):  # augmentation in float32 under bf16/16-mixed training
            mean, std = mean.float().view(1, 3, 1), std.float().view(1, 3, 1)
            x = images.permute(0, 3, 1, 2).float().contiguous()
            # align_corners=True: reflection about the edge pixels' centres, OpenCV's BORDER_REFLECT_101
            x = F.grid_sample(
                x, _grid(d["theta"], h, w), mode="bilinear", padding_mode="reflection", align_corners=True
            )
            if len(d["hsv_rows"]):
                x.index_copy_(
                    0, d["hsv_rows"], _hsv_rows(x.index_select(0, d["hsv_rows"]), d["hsv"], self.hexcone.float())
                )
            colour = d["colour"]  # colour in 0-1 units, then normalised: M' = M / std, b' = (255 b - mean) / std
            x = torch.baddbmm((255.0 * colour[:, :, 3:] - mean) / std, colour[:, :, :3] / std, x.flatten(2)).view_as(x)
            if len(d["blur_rows"]):
                x = _convolve_rows(x, d["blur_rows"], d["kernels"])
            if len(d["noise_rows"]):
                x = _add_noise(x, d["noise_rows"], d["noise"], std.view(1, 3, 1, 1))
            black, white = (-mean / std)[..., None], ((255.0 - mean) / std)[..., None]
            x = torch.clamp_(x, black, white)
            if len(d["erase_rows"]):
                fill = (self.preset.erase.fill - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
                x.index_copy_(0, d["erase_rows"], _erase_rows(x.index_select(0, d["erase_rows"]), d["boxes"], fill))
            return x


def columns(p: Preset) -> dict[str, int]:
    """How many uniforms each op reads per image, in the preset's op order."""
    return {
        "flip": 1,
        "affine": 6,  # on, scale x, scale y, shift x, shift y, angle
        "brightness_contrast": 3,  # on, contrast, brightness
        "hsv": 4,  # on, hue, saturation, value
        "blur_noise": 9,  # on, which, kernel size, sigma, angle, direction, shift x, shift y, noise std
        "gray": 1,
        "erase": 2 + 4 * p.erase.holes[1],  # on, count, then per hole height, width, top, left
    }


def width(p: Preset) -> int:
    """Uniforms per image the preset draws."""
    return sum(columns(p).values())


@dataclass
class Draw:
    """One batch's per-image parameters, drawn on the host op by op (each op its own columns)."""

    theta: np.ndarray  # (N, 2, 3) sampling matrices
    colour: np.ndarray  # (N, 3, 4) colour maps [M | b] (0-1 units)
    hsv_rows: np.ndarray  # (S,) images shifted in HSV ...
    hsv: np.ndarray  # (S, 5) ... after contrast, brightness (the first two), by hue (sextants), saturation, value (0-1)
    blur_rows: np.ndarray  # (B,) images blurred ...
    kernels: np.ndarray  # (B, K, K) ... with these kernels
    noise_rows: np.ndarray  # (M,) images with Gaussian noise ...
    noise: np.ndarray  # (M, 2) ... of this std (0-1 units), the same in every channel where 1 (grey images)
    erase_rows: np.ndarray  # (E,) images with boxes ...
    boxes: np.ndarray  # (E, holes, 4) ... (y0, y1, x0, x1) in pixels, empty boxes where fewer holes were drawn

    @classmethod
    def sample(cls, p: Preset, u: np.ndarray, h: int, w: int) -> Draw:
        """Every op's parameters for images of ``h`` x ``w`` from ``u``, (N, width(p)) uniforms in [0, 1)."""
        cuts = np.cumsum(list(columns(p).values()))[:-1]
        u_flip, u_affine, u_bc, u_hsv, u_blur, u_gray, u_erase = np.split(u, cuts, axis=1)
        n = len(u)
        flip = u_flip[:, 0] < p.flip.p
        theta = _warp(u_affine, flip, h, w, p)
        alpha, beta = _brightness_contrast(u_bc, p)
        hsv_rows, shifts = _hsv(u_hsv, p)
        blur_rows, kernels, noise_rows, noise_std = _blur_noise(u_blur, p.blur_noise)
        grey = u_gray[:, 0] < p.gray.p
        erase_rows, boxes = _erase(u_erase, h, w, p)
        colour = np.zeros((n, 3, 4))
        colour[:, :, :3] = np.where(grey[:, None, None], _GREY, np.eye(3))
        plain = np.ones(n, bool)
        plain[hsv_rows] = False  # contrast and brightness of these rows come before their HSV shift
        colour[plain, :, :3] *= alpha[plain, None, None]
        colour[plain, :, 3] = beta[plain, None]
        hsv = np.column_stack([alpha[hsv_rows], beta[hsv_rows], shifts])
        # noise then grey (albumentations' order) is grey noise: one field in every channel, luma-weighted
        shared = grey[noise_rows]
        noise = np.column_stack([noise_std * np.where(shared, np.linalg.norm(_LUMA), 1.0), shared])
        return cls(theta, colour, hsv_rows, hsv, blur_rows, kernels, noise_rows, noise, erase_rows, boxes)

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors on ``device`` in one copy (pinned and non-blocking on CUDA: no host sync);
        row indices as int64."""
        parts = {
            "theta": self.theta,
            "colour": self.colour,
            "hsv_rows": self.hsv_rows,
            "hsv": self.hsv,
            "blur_rows": self.blur_rows,
            "kernels": self.kernels,
            "noise_rows": self.noise_rows,
            "noise": self.noise,
            "erase_rows": self.erase_rows,
            "boxes": self.boxes,
        }
        host = torch.from_numpy(np.concatenate([a.ravel() for a in parts.values()]).astype(np.float32))
        packed = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        chunks = packed.split([a.size for a in parts.values()])
        out = {name: chunk.view(a.shape) for (name, a), chunk in zip(parts.items(), chunks, strict=True)}
        for name in ("hsv_rows", "blur_rows", "noise_rows", "erase_rows", "boxes"):
            out[name] = out[name].long()
        return out


def _between(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Uniform draws in [low, high) from uniforms in [0, 1)."""
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _integers(u: np.ndarray, low: int, high: int) -> np.ndarray:
    """Uniform integers in [low, high] (both included) from uniforms in [0, 1)."""
    return np.minimum(low + np.floor(u * (high - low + 1)), high).astype(int)


def _warp(u: np.ndarray, flip: np.ndarray, h: int, w: int, p: Preset) -> np.ndarray:
    """(N, 2, 3) sampling matrices in align_corners=True normalised coordinates: flip and affine in one.

    albumentations maps a centred pixel position q to ``t + R(angle) S q`` (whole-pixel shift t,
    per-axis scale S), after the flip; output pixel q' samples the input at the inverse, here in
    normalised coordinates ``D q`` with ``D = diag(2 / (W - 1), 2 / (H - 1))``:
    ``D F S^-1 R^T D^-1 (q'_n - D t)``.
    """
    a = p.affine
    on = u[:, 0] < a.p
    sx = np.where(on, _between(u[:, 1], a.scale), 1.0)
    sy = np.where(on, _between(u[:, 2], a.scale), 1.0)
    tx = np.where(on, np.trunc(_between(u[:, 3], a.translate) * w), 0.0)
    ty = np.where(on, np.trunc(_between(u[:, 4], a.translate) * h), 0.0)
    angle = np.where(on, np.radians(_between(u[:, 5], a.rotate)), 0.0)
    cos, sin = np.cos(angle), np.sin(angle)
    rotate_t = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # R^T, R = [[c, s], [-s, c]]
    d = np.array([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    inverse = np.zeros((len(u), 2, 2))
    inverse[:, 0, 0], inverse[:, 1, 1] = np.where(flip, -1.0, 1.0) / sx, 1.0 / sy  # F S^-1
    matrix = d[None, :, None] * (inverse @ rotate_t) / d[None, None, :]  # D F S^-1 R^T D^-1
    shift = np.stack([tx, ty], -1) * d
    theta = np.empty((len(u), 2, 3))
    theta[:, :, :2] = matrix
    theta[:, :, 2] = -(matrix @ shift[:, :, None])[:, :, 0]
    return theta


def _grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """affine_grid's (N, H, W, 2) grid (align_corners=True) by broadcasting (its batched 3x2 matmul is slower on CPU)."""
    ys = torch.linspace(-1.0, 1.0, h, device=theta.device, dtype=theta.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=theta.device, dtype=theta.dtype)
    t = theta[:, :, :, None, None]
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys[:, None] + t[:, 0, 2]
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys[:, None] + t[:, 1, 2]
    return torch.stack([gx, gy], -1)


def _brightness_contrast(u: np.ndarray, p: Preset) -> tuple[np.ndarray, np.ndarray]:
    """Per image the contrast factor and the brightness offset (0-1 units): ``x * alpha + beta``."""
    bc = p.brightness_contrast
    on = u[:, 0] < bc.p
    return np.where(on, 1.0 + _between(u[:, 1], bc.contrast), 1.0), np.where(on, _between(u[:, 2], bc.brightness), 0.0)


def _hsv(u: np.ndarray, p: Preset) -> tuple[np.ndarray, np.ndarray]:
    """Rows shifted in HSV and their (hue in sextants, saturation, value in 0-1 units) shifts."""
    rows = np.flatnonzero(u[:, 0] < p.hsv.p)
    hue = _between(u[rows, 1], p.hsv.hue) / 30.0  # OpenCV hue units are 2 degrees; a sextant is 60
    sat = _between(u[rows, 2], p.hsv.saturation) / 255.0
    val = _between(u[rows, 3], p.hsv.value) / 255.0
    return rows, np.column_stack([hue, sat, val])


def _hsv_rows(x: torch.Tensor, params: torch.Tensor, hexcone: torch.Tensor) -> torch.Tensor:
    """Contrast/brightness, clip, then the HSV shift of (S, 3, H, W) images in 0-255 units.

    OpenCV's hexcone HSV (value = max, saturation = chroma / value, hue in sextants) written out in
    tensor ops: no library does it batched with per-image shifts on the device. Branch-free float
    arithmetic (sign and floor for the masks and the modulo: torch's boolean masks, ``where`` and
    ``remainder`` cost 5-15 float passes each on a CPU), per pixel on one channel until the end.
    ``hexcone``: (3, 3, 1, 1) rows [centre, sign, offset] of each channel's share of a pure hue.
    """
    alpha, beta, hue, sat, val = (params[:, i].view(-1, 1, 1, 1) for i in range(5))
    x = torch.addcmul(255.0 * beta, x, alpha).clamp_(0.0, 255.0)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value = x.amax(1, keepdim=True)
    chroma = value - x.amin(1, keepdim=True)
    red = 1.0 - torch.sign(value - r)  # 1 where red is the largest channel
    green = (1.0 - torch.sign(value - g)) * (1.0 - red)  # ... else green
    blue = 1.0 - red - green
    turn = red * (g - b) + green * (b - r) + blue * (r - g)
    h = turn.div_(chroma.clamp_min(1e-12)).add_(2.0 * green + 4.0 * blue + hue)  # the shifted hue, in sextants
    h = h.sub_(torch.floor(h / 6.0).mul_(6.0))  # modulo 6
    s = chroma / value.clamp_min(1e-12)
    coloured = torch.floor(s * 255.0 + 0.5).clamp_max_(1.0)  # 0 where the 8-bit saturation is 0: stays grey
    value = value.add_(255.0 * val).clamp_(0.0, 255.0)
    chroma = s.add_(sat).clamp_(0.0, 1.0).mul_(coloured).mul_(value)  # the new saturation times the new value
    # a pure hue's channels: R = clip(|h - 3| - 1), G = clip(2 - |h - 2|), B = clip(2 - |h - 4|), in 0-1
    share = torch.addcmul(hexcone[2], (h - hexcone[0]).abs_(), hexcone[1]).clamp_(0.0, 1.0)
    return torch.addcmul(value - chroma, share, chroma)


def kernel_size(blur: BlurOrNoise) -> int:
    """The side of the kernels a batch carries: the largest size the preset can draw (odd)."""
    return blur.kernel[1] + (blur.kernel[1] % 2 == 0)


def _blur_noise(u: np.ndarray, b: BlurOrNoise) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which images get which of the three (albumentations' OneOf), with their kernels and noise std."""
    on = u[:, 0] < b.p
    pick = np.minimum((u[:, 1] * 3).astype(int), 2)  # 0 Gaussian blur, 1 motion blur, 2 noise
    gauss, motion, noisy = (np.flatnonzero(on & (pick == i)) for i in range(3))
    size = kernel_size(b)
    kernels = np.zeros((len(u), size, size))
    kernels[gauss] = _gaussian_kernels(u[gauss], b, size)
    kernels[motion] = _motion_kernels(u[motion], b, size)
    rows = np.flatnonzero(on & (pick < 2))
    return rows, kernels[rows], noisy, _between(u[noisy, 8], b.noise_std)


def _gaussian_kernels(u: np.ndarray, b: BlurOrNoise, size: int) -> np.ndarray:
    """GaussianBlur: size drawn in the range (an even one becomes the next odd), sigma drawn; centred in size x size."""
    k = _integers(u[:, 2], *b.kernel)
    k = k + (k % 2 == 0)
    sigma = _between(u[:, 3], b.sigma)
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r[None] / sigma[:, None]) ** 2) * (np.abs(r[None]) <= k[:, None] // 2)
    g /= g.sum(1, keepdims=True)
    return g[:, :, None] * g[:, None, :]


def _motion_kernels(u: np.ndarray, b: BlurOrNoise, size: int) -> np.ndarray:
    """MotionBlur (albumentations' create_motion_kernel): an odd size drawn, a line of that many
    points at an angle drawn in 0-360 degrees, biased forward or backward by a direction drawn in
    -1..1, shifted by up to a quarter of the size, rounded to pixels; centred in size x size."""
    low = max(3, b.kernel[0] + (b.kernel[0] % 2 == 0))
    high = max(low, b.kernel[1] + (b.kernel[1] % 2 == 0))
    k = low + 2 * _integers(u[:, 2], 0, (high - low) // 2)
    half = k // 2
    angle = np.radians(360.0 * u[:, 4])
    direction = 2.0 * u[:, 5] - 1.0
    start = np.where(direction > 0, -half * (1 - direction), -half)
    end = np.where(direction < 0, half * (1 + direction), half)
    j = np.minimum(np.arange(size)[None], k[:, None] - 1)  # point j of k (the last repeated up to size)
    t = start[:, None] + (end - start)[:, None] * j / (k - 1)[:, None]
    shift_x, shift_y = (2.0 * u[:, 6] - 1.0) * half / 2, (2.0 * u[:, 7] - 1.0) * half / 2
    x = np.clip(np.round(half[:, None] + np.cos(angle)[:, None] * t + shift_x[:, None]), 0, k[:, None] - 1)
    y = np.clip(np.round(half[:, None] + np.sin(angle)[:, None] * t + shift_y[:, None]), 0, k[:, None] - 1)
    offset = ((size - k) // 2)[:, None]
    kernels = np.zeros((len(u), size, size))
    kernels[np.arange(len(u))[:, None], (y + offset).astype(int), (x + offset).astype(int)] = 1.0
    return kernels / kernels.sum((1, 2), keepdims=True)


def _convolve_rows(x: torch.Tensor, rows: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each listed image correlated with its own kernel (one grouped convolution, borders
    reflected as OpenCV's filter2D does: BORDER_REFLECT_101)."""
    c, h, w = x.shape[1:]
    sub = x.index_select(0, rows).reshape(1, -1, h, w)
    pad = kernels.shape[-1] // 2
    sub = F.conv2d(
        F.pad(sub, (pad, pad, pad, pad), mode="reflect"), kernels.repeat_interleave(c, 0)[:, None], groups=sub.shape[1]
    )
    return x.index_copy_(0, rows, sub.view(-1, c, h, w))


def _add_noise(x: torch.Tensor, rows: torch.Tensor, noise: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian noise per pixel (and channel, or one field in all three for grey images) in normalised units."""
    field = torch.randn((len(rows), *x.shape[1:]), device=x.device)
    field = torch.where(noise[:, 1].view(-1, 1, 1, 1) > 0, field[:, :1].expand_as(field), field)
    return x.index_add_(0, rows, field * (noise[:, 0].view(-1, 1, 1, 1) * 255.0 / std))


def _erase(u: np.ndarray, h: int, w: int, p: Preset) -> tuple[np.ndarray, np.ndarray]:
    """CoarseDropout: rows with boxes, and per row (holes, 4) boxes (y0, y1, x0, x1); unused holes empty."""
    e = p.erase
    rows = np.flatnonzero(u[:, 0] < e.p)
    u = u[rows]
    count = _integers(u[:, 1], *e.holes)
    slots = np.arange(e.holes[1])
    hh = (h * _between(u[:, 2 + 4 * slots], e.height)).astype(int)
    ww = (w * _between(u[:, 3 + 4 * slots], e.width)).astype(int)
    y0 = np.floor(u[:, 4 + 4 * slots] * (h - hh + 1)).astype(int)
    x0 = np.floor(u[:, 5 + 4 * slots] * (w - ww + 1)).astype(int)
    used = slots[None] < count[:, None]
    boxes = np.stack([y0, y0 + hh * used, x0, x0 + ww * used], -1)
    return rows, boxes


def _erase_rows(x: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(E, C, H, W) images with their boxes (E, holes, 4) filled: the union of the boxes as one
    batched product of their row and column spans (no per-box ops), then one blend."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    y0, y1, x0, x1 = (boxes[:, :, i, None].to(x.dtype) for i in range(4))
    rows = ((ys >= y0) & (ys < y1)).to(x.dtype)  # (E, holes, H)
    cols = ((xs >= x0) & (xs < x1)).to(x.dtype)  # (E, holes, W)
    covered = torch.bmm(rows.transpose(1, 2), cols).clamp_max_(1.0)  # (E, H, W): 1 inside any box
    return torch.lerp(x, fill.expand_as(x), covered[:, None])


def build_device_augment(
    cfg: AugmentConfig, image_size: tuple[int, int] | list[int] | None = None
) -> DeviceAugment | None:
    """The training module's batch augmentation, or None (in the loader, preset none, or custom transforms)."""
    if not on_device(cfg, image_size) or cfg.preset == "none":
        return None
    return DeviceAugment(cfg.preset)
