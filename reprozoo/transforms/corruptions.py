"""The CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), re-implemented with numpy and PIL only.

CIFAR-10-C was made by ``ImageNet-C/create_c/make_cifar_c.py`` of the authors' ``hendrycks/robustness``
repository: 19 corruptions of the 10,000 CIFAR-10 test images at 5 severities, each image converted with
``np.uint8`` (truncation, after clipping to [0, 255]). Every severity parameter below is copied from that script
(its CIFAR-specific lists, NOT the far harsher ones of ``make_imagenet_c.py``), in ``SEVERITY_PARAMS``.

That script needs scikit-image, OpenCV, SciPy and ImageMagick (through Wand), none of which this package depends
on. Each corruption is re-derived here from what those libraries compute, batched over images:

* scikit-image ``gaussian`` (= ``scipy.ndimage.gaussian_filter``: kernel radius ``int(truncate * sigma + 0.5)``,
  modes ``nearest`` / ``reflect``), ``random_noise(mode="s&p")`` (each value flipped with probability ``amount``,
  half to 1, half to 0) and ``rgb2hsv`` / ``hsv2rgb``;
* SciPy ``ndimage.zoom(order=1)`` (output size ``round(n * zoom)``, input coordinate ``o * (n - 1) / (m - 1)``)
  and ``map_coordinates(order=1, mode="reflect")``;
* ImageMagick's ``MotionBlurImage`` (``magick/effect.c``): a one-sided kernel of width
  ``2 * ceil(radius) + 1`` with weights ``exp(-i^2 / (2 sigma^2))``, taps at
  ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))``, edge pixels repeated outside the image, the sum rounded to a
  16-bit quantum and written to 8 bits as the script's PNG round trip does;
* OpenCV's ``GaussianBlur`` / ``filter2D`` (``defocus_blur``'s anti-aliased disk), ``getAffineTransform`` /
  ``warpAffine`` (bilinear with its 1/32-pixel fixed-point coordinates, ``BORDER_REFLECT_101``), ``cvtColor``
  (grey = 0.299 R + 0.587 G + 0.114 B), and for ``spatter``: ``Canny`` (3x3 Sobel, L1 magnitude, its
  non-maximum suppression and hysteresis), ``distanceTransform(DIST_L2, 5)`` (the 5x5 chamfer mask 1 / 1.4 /
  2.1969, float32 sums as OpenCV's x86 builds compute them), ``threshold``, ``blur``, ``equalizeHist`` and
  ``filter2D``.

Given the same random draws, every corruption but ``frost`` was checked during development to give the same
bytes as the script's own code run with SciPy 1.13, scikit-image 0.24, OpenCV 4.5.5 (the pip wheel), Pillow and
ImageMagick 6.9.11 Q16, on 300 real CIFAR-10 test images at each severity; ``frost`` is checked by the test suite
(``test_frost_is_make_cifar_c_s_byte_for_byte_on_real_images``) against the script's own lines run with the
OpenCV of the dev dependencies on real CIFAR-10 test images, at all 5 severities and from all 5 textures. Sums are
ordered as those libraries order them (e.g. scipy's symmetric correlation) so that the final truncation to uint8
agrees too. Other versions of those libraries may differ in
the last bit (the script's outputs themselves depend on them).

Two behaviours of the script are kept on purpose because the published data have them: ``glass_blur``'s "swap"
``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views only copies ``x[h', w']`` into ``x[h, w]``, and its
offsets come from ``randint(-1, 1)``, i.e. -1 or 0; ``zoom_blur``'s ``np.arange(1, 1.06, 0.01)`` lists have 7,
12, 16, 21 and 26 zoom factors (floating-point ends included).

``frost`` blends a crop of one of five texture photographs (``frost1.png`` ... ``frost5.jpg`` of the same folder
of the robustness repository, Apache-2.0; its ``frost6.jpg`` is never drawn), read with PIL and shrunk by 5 as
OpenCV's bilinear ``resize(fx=0.2, fy=0.2)`` does (at that exact factor: every fifth pixel from the third).
reprozoo does not ship them: :mod:`reprozoo.transforms.frost_textures` finds them in ``frost_dir``, the data
root's ``frost/``, or the ``imagecorruptions`` package (which ships the same files), else downloads them from the
repository (not when offline), and checks every file's sha256; so all 19 corruptions can be generated, and
:func:`unavailable_corruptions` says why ``frost`` cannot be when its textures cannot be had.

Randomness: not numpy's global state but one generator per image, derived from ``(seed, corruption, severity,
image index)`` (:func:`image_rng`), so results are deterministic per seed and do not depend on the order, the
batching or the subset of images generated. The random streams are not the script's, so noise patterns differ
from the published files while following the same distributions. Bump ``CORRUPTIONS_VERSION`` whenever an
output of this module can change: generated-data caches are keyed on it.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from reprozoo.transforms import frost_textures
from reprozoo.transforms._image_ops import (
    IMAGE_SIZE,
    affine_from_points,
    apply_zoom,
    box3,
    canny,
    correlate2d,
    crop_kernel,
    disk,
    distance_transform_5x5,
    equalize_hist,
    from_last,
    gaussian,
    gray,
    hsv2rgb,
    map_coordinates_reflect,
    motion_blur,
    rgb2hsv,
    to_last,
    to_uint8,
    warp_affine,
    wrap_uint8,
    zoom_last,
)

CORRUPTIONS_VERSION = "reprozoo-cifar10c-corruptions-1"

# the order of make_cifar_c.py; the first 15 are the benchmark (robustbench, TENT), the last 4 the "extra" ones
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

_S = IMAGE_SIZE  # elastic_transform's parameters are fractions of the image size in the script
# Severity 1..5 parameters, verbatim from hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py.
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # ImageMagick radius, sigma
    "zoom_blur": tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),  # zoom factors
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),  # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, plasma wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor around the per-channel mean
    "elastic_transform": (
        (_S * 0, _S * 0, _S * 0.08),
        (_S * 0.05, _S * 0.2, _S * 0.07),
        (_S * 0.08, _S * 0.06, _S * 0.06),
        (_S * 0.1, _S * 0.04, _S * 0.05),
        (_S * 0.1, _S * 0.03, _S * 0.03),
    ),  # displacement scale, displacement smoothing sigma, affine jitter
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # shrink factor (box filter down and up)
    "jpeg_compression": (80, 65, 58, 50, 40),  # PIL JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # multiplicative noise std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),  # sigma
    "spatter": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),  # loc, scale, sigma, threshold, intensity (water) or sigma (mud), 0 = water / 1 = mud
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation factor, offset
}

FROST_FILES = frost_textures.FROST_FILES
FROST_USED = frost_textures.FROST_USED  # np.random.randint(5): the script never picks frost6.jpg

_NOISES = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")


# ----------------------------------------------------------------------------------------------- availability


def unavailable_corruptions(frost_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{name: why it cannot be generated here} (empty when all 19 can). Only ``frost`` can be missing: when its
    textures are not in ``frost_dir`` (when given), or are found nowhere here while offline (see
    :func:`reprozoo.transforms.frost_textures.frost_unavailable_reason`; textures that can still be downloaded
    count as available)."""
    why = frost_textures.frost_unavailable_reason(frost_dir)
    return {"frost": why} if why else {}


def available_corruptions(frost_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The corruptions :func:`corrupt` can generate, in the official order: all 19, or all but ``frost`` when its
    texture photographs cannot be had (see :func:`unavailable_corruptions`)."""
    missing = unavailable_corruptions(frost_dir)
    return tuple(c for c in CORRUPTIONS if c not in missing)


def check_corruption(name: str, frost_dir: str | os.PathLike | None = None) -> None:
    """ValueError naming ``name`` when it is not a CIFAR-10-C corruption (listing the valid ones) or cannot be
    generated here (saying why)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; the CIFAR-10-C corruptions are {', '.join(CORRUPTIONS)}")
    why = unavailable_corruptions(frost_dir).get(name)
    if why:
        raise ValueError(f"the corruption {name!r} is unavailable: {why}")


# ----------------------------------------------------------------------------------------------- randomness


def image_rng(seed: int, corruption: str, severity: int, index: int) -> np.random.Generator:
    """The generator of one (corruption, severity, image index): independent of every other one and of order."""
    code = zlib.crc32(corruption.encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), code, int(severity), int(index)]))


def _draw(rngs: Sequence[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(draw(r)) for r in rngs])


# ----------------------------------------------------------------------------------------------- corruptions
# Each takes uint8 images (N, 32, 32, 3), the severity's parameters and one generator per image, and returns
# what the script's function returns (floats in [0, 255], or uint8), before the final np.uint8.


def _gaussian_noise(x, c, rngs):
    x = x / 255.0
    noise = _draw(rngs, lambda r: r.normal(size=x.shape[1:], scale=c))
    return np.clip(x + noise, 0, 1) * 255


def _shot_noise(x, c, rngs):
    x = x / 255.0
    counts = np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)])
    return np.clip(counts / c, 0, 1) * 255


def _impulse_noise(x, c, rngs):
    out = x / 255.0
    u = _draw(rngs, lambda r: r.random((2,) + x.shape[1:]))
    flipped, salted = u[:, 0] < c, u[:, 1] < 0.5  # random_noise(mode="s&p", amount=c), salt_vs_pepper = 0.5
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return np.clip(out, 0, 1) * 255


def _speckle_noise(x, c, rngs):
    x = x / 255.0
    noise = _draw(rngs, lambda r: r.normal(size=x.shape[1:], scale=c))
    return np.clip(x + x * noise, 0, 1) * 255


def _gaussian_blur(x, c, rngs):
    return np.clip(gaussian(x / 255.0, c), 0, 1) * 255


def _glass_blur(x, c, rngs):
    sigma, delta, iterations = c
    size = x.shape[1]
    y = to_uint8(gaussian(x / 255.0, sigma) * 255)
    pos = np.arange(size - delta, delta, -1)[::-1]  # the script's h, w: 32 - delta down to delta + 1
    batch = np.arange(len(x))[:, None, None]
    for _it in range(iterations):
        shifts = _draw(rngs, lambda r: r.integers(-delta, delta, size=(len(pos), len(pos), 2)))
        dx, dy = shifts[..., 0], shifts[..., 1]
        # x[h, w] <- x[h + dy, w + dx]: the sources are never written before they are read in the script's
        # scan order, so the whole pass is one gather (the "swap" copies, see the module docstring)
        new = y.copy()
        new[:, pos[0] : pos[-1] + 1, pos[0] : pos[-1] + 1] = y[batch, pos[:, None] + dy, pos[None, :] + dx]
        y = new
    return np.clip(gaussian(y / 255.0, sigma), 0, 1) * 255


def _defocus_blur(x, c, rngs):
    kernel = crop_kernel(disk(radius=c[0], alias_blur=c[1]))
    return np.clip(correlate2d(x / 255.0, kernel, "reflect101"), 0, 1) * 255


def _motion_blur_corruption(x, c, rngs):
    angles = np.array([r.uniform(-45, 45) for r in rngs])
    return motion_blur(x, radius=c[0], sigma=c[1], angles=angles)


def _zoom_blur(x, c, rngs):
    x = (x / 255.0).astype(np.float32)
    last = to_last(x)
    wide = last.astype(np.float64)
    out = np.zeros_like(last)
    for zoom in c:
        out += zoom_last(wide, float(zoom)).astype(np.float32)  # scipy returns float32 for float32 input
    x = from_last((last + out) / np.float32(len(c) + 1), x.shape)
    return np.clip(x, 0, 1) * 255


def _snow(x, c, rngs):
    x = (x / 255.0).astype(np.float32)
    n, h, w = x.shape[:3]
    layer = _draw(rngs, lambda r: r.normal(size=(h, w), loc=c[0], scale=c[1]))
    layer = apply_zoom(layer, c[2])
    layer[layer < c[3]] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    angles = np.array([r.uniform(-135, -45) for r in rngs])
    layer = (motion_blur(layer, radius=c[4], sigma=c[5], angles=angles) / 255.0)[..., None]
    grey = gray(x)[..., None]
    x = np.float32(c[6]) * x + np.float32(1 - c[6]) * np.maximum(x, grey * np.float32(1.5) + np.float32(0.5))
    return np.clip(x + layer + layer[:, ::-1, ::-1], 0, 1) * 255


def shrink_frost_texture(rgb: np.ndarray) -> np.ndarray:
    """``cv2.resize(texture, (0, 0), fx=0.2, fy=0.2)`` (bilinear) of an (H, W, 3) uint8 texture: the output is
    ``round(H / 5) x round(W / 5)`` and, the scale being exactly 5, output pixel k samples input pixel 5k + 2
    (clamped to the edge) with weight 1."""
    h, w = rgb.shape[:2]
    nh, nw = int(np.rint(h * 0.2)), int(np.rint(w * 0.2))
    rows = np.minimum(np.arange(nh) * 5 + 2, h - 1)
    cols = np.minimum(np.arange(nw) * 5 + 2, w - 1)
    return rgb[rows][:, cols]


def load_frost_textures(frost_dir: str | os.PathLike | None = None) -> list[np.ndarray]:
    """The script's frost textures ``frost1.png`` .. ``frost5.jpg`` as RGB uint8 (the pixels of the script's
    ``cv2.imread``, in RGB order), shrunk by :func:`shrink_frost_texture`. They are read from ``frost_dir``, or
    found or downloaded by :func:`reprozoo.transforms.frost_textures.resolve_frost_dir` when it is None; each
    file's bytes are checked against their official sha256 before they are decoded (FileNotFoundError or
    ValueError naming the file)."""
    folder = frost_textures.resolve_frost_dir(frost_dir)
    textures = []
    for name in frost_textures.used_frost_files():
        data = frost_textures.read_frost_texture(folder, name)
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))  # RGBA PNGs lose their alpha, as with cv2.imread
        except Exception as err:  # PIL raises many types for a bad file
            raise ValueError(f"cannot read the frost texture {folder / name}: {type(err).__name__}: {err}") from err
        small = shrink_frost_texture(rgb)
        if min(small.shape[:2]) <= IMAGE_SIZE:
            raise ValueError(
                f"the frost texture {folder / name} is {rgb.shape[1]}x{rgb.shape[0]}; shrunk by 5 it must exceed 32x32"
            )
        textures.append(small)
    return textures


def frost_draws(
    rngs: Sequence[np.random.Generator], textures: Sequence[np.ndarray], size: int = IMAGE_SIZE
) -> np.ndarray:
    """int64 (N, 3): per image, the script's ``idx = randint(5)``, then ``x_start = randint(0, h - size)`` (top row)
    and ``y_start = randint(0, w - size)`` (left column) of the crop of shrunk texture ``idx`` (h x w), drawn in
    that order from the image's generator."""
    out = np.empty((len(rngs), 3), dtype=np.int64)
    for k, r in enumerate(rngs):
        idx = int(r.integers(FROST_USED))
        h, w = textures[idx].shape[:2]
        out[k] = (idx, int(r.integers(0, h - size)), int(r.integers(0, w - size)))
    return out


def frost_blend(x: np.ndarray, c: tuple[float, float], textures: Sequence[np.ndarray], draws: np.ndarray) -> np.ndarray:
    """``np.clip(c[0] * x + c[1] * crop, 0, 255)`` (float64) of each image and its crop given by ``draws``
    (:func:`frost_draws`), before the final ``np.uint8``."""
    out = np.empty(x.shape, dtype=np.float64)
    size = x.shape[1]
    for k, (idx, top, left) in enumerate(np.asarray(draws)):
        crop = textures[idx][top : top + size, left : left + size]
        out[k] = np.clip(c[0] * x[k].astype(np.float64) + c[1] * crop, 0, 255)
    return out


def _frost(x, c, rngs, textures):
    return frost_blend(x, c, textures, frost_draws(rngs, textures, x.shape[1]))


def _plasma_fractal(u: np.ndarray, wibbledecay: float, mapsize: int = IMAGE_SIZE) -> np.ndarray:
    """The script's diamond-square height map (N, mapsize, mapsize) in [0, 1], from uniform(-1, 1) draws ``u``
    (N, mapsize**2 - 1) taken in a fixed order (``uniform(-w, w)`` = ``w * uniform(-1, 1)``)."""
    n = len(u)
    m = np.zeros((n, mapsize, mapsize))
    step, wibble, pos = mapsize, 100.0, 0

    def noise(shape):
        nonlocal pos
        k = int(np.prod(shape))
        out = u[:, pos : pos + k].reshape((n,) + shape)
        pos += k
        return out

    while step >= 2:
        half = step // 2
        corners = m[:, 0:mapsize:step, 0:mapsize:step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        m[:, half:mapsize:step, half:mapsize:step] = squares / 4 + wibble * wibble * noise(squares.shape[1:])
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        m[:, 0:mapsize:step, half:mapsize:step] = lt / 4 + wibble * wibble * noise(lt.shape[1:])
        m[:, half:mapsize:step, 0:mapsize:step] = tt / 4 + wibble * wibble * noise(tt.shape[1:])
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _fog(x, c, rngs):
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    u = _draw(rngs, lambda r: r.uniform(-1, 1, size=IMAGE_SIZE * IMAGE_SIZE - 1))
    x = x + c[0] * _plasma_fractal(u, c[1])[:, : x.shape[1], : x.shape[2], None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(x, c, rngs):
    hsv = rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def _saturate(x, c, rngs):
    hsv = rgb2hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def _contrast(x, c, rngs):
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(x, c, rngs):
    image = (x / 255.0).astype(np.float32)
    n, h, w = image.shape[:3]
    center = np.float32([h, w]) // 2
    square = min(h, w) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    jitter = _draw(rngs, lambda r: r.uniform(-c[2], c[2], size=pts1.shape)).astype(np.float32)
    matrices = np.stack([affine_from_points(pts1, pts1 + j) for j in jitter])
    image = warp_affine(image, matrices)
    fields = _draw(rngs, lambda r: r.uniform(-1, 1, size=(2, h, w)))
    dxy = (gaussian(fields.reshape(2 * n, h, w), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dxy = dxy.reshape(n, 2, h, w)
    rows = np.arange(h)[None, :, None] + dxy[:, 1].astype(np.float64)
    cols = np.arange(w)[None, None, :] + dxy[:, 0].astype(np.float64)
    out = map_coordinates_reflect(image, rows, cols).astype(np.float32)
    return np.clip(out, 0, 1) * 255


def _pil_each(x, op) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(img)).convert("RGB")) for img in x])


def _pixelate(x, c, rngs):
    size = x.shape[1]
    small = int(size * c)
    return _pil_each(x, lambda im: im.resize((small, small), Image.BOX).resize((size, size), Image.BOX))


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _jpeg_compression(x, c, rngs):
    return _pil_each(x, lambda im: _jpeg(im, c))


def _spatter(x, c, rngs):
    x = (x / 255.0).astype(np.float32)
    n, h, w = x.shape[:3]
    liquid = _draw(rngs, lambda r: r.normal(size=(h, w), loc=c[0], scale=c[1]))
    liquid = gaussian(liquid, sigma=c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water
        liquid8 = wrap_uint8(liquid * 255)
        dist = np.where(canny(liquid8, 50, 150), 0, 255).astype(np.uint8)  # 255 - Canny
        dist = distance_transform_5x5(dist != 0)
        dist = np.minimum(dist, np.float32(20))  # THRESH_TRUNC at 20
        dist = (box3(dist) * (1.0 / 9)).astype(np.float32).astype(np.uint8)  # float blur, then truncation
        dist = equalize_hist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(np.rint(correlate2d(dist.astype(np.float64), ker, "reflect101")), 0, 255)
        dist = np.floor(box3(dist) / 9 + 0.5).astype(np.float32)  # uint8 blur rounds (never a tie)
        m = liquid8.astype(np.float32) * dist
        with np.errstate(invalid="ignore", divide="ignore"):
            m = m / m.max(axis=(1, 2), keepdims=True)  # 0 / 0 = NaN when there is no water, as in the script
        m = m * np.float32(c[4])
        color = (np.array([175, 238, 238]) / 255.0).astype(np.float32)  # pale turquoise
        return np.clip(x + m[..., None] * color, 0, 1) * 255
    # mud
    m = np.where(liquid > c[3], 1, 0).astype(np.float32)
    m = gaussian(m, sigma=c[4])
    m[m < 0.8] = 0
    color = (np.array([63, 42, 20]) / 255.0).astype(np.float32) * m[..., None]  # mud brown
    x = x * (1 - m[..., None])
    return np.clip(x + color, 0, 1) * 255


_FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}


# ----------------------------------------------------------------------------------------------- entry point


def corrupt(
    images: np.ndarray,
    corruption: str,
    severity: int,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    frost_dir: str | os.PathLike | None = None,
    chunk_size: int = 500,
    progress: bool = False,
) -> np.ndarray:
    """``images`` (uint8 (N, 32, 32, 3)) corrupted as CIFAR-10-C's ``corruption`` at ``severity`` (1..5): uint8
    of the same shape.

    Image ``k`` uses the generator :func:`image_rng` ``(seed, corruption, severity, indices[k])``; ``indices``
    (default ``0..N-1``) are the images' positions in their data set, so that any subset or order gives the rows
    of the whole. Work goes in chunks of ``chunk_size`` images (memory), with a tqdm bar when ``progress``.
    ``frost`` reads its texture photographs from ``frost_dir``, or, when it is None, finds or downloads them (see
    :func:`load_frost_textures`). ValueError for an unknown or unavailable corruption, a severity outside 1..5 or
    images of another shape; FileNotFoundError, saying what to put where, when frost's textures cannot be had.
    """
    check_corruption(corruption, frost_dir)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"images must be uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.dtype} {tuple(images.shape)}"
        )
    n = len(images)
    indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) != n:
        raise ValueError(f"indices has {len(indices)} entries for {n} images")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    params = SEVERITY_PARAMS[corruption][severity - 1]
    fn = _FUNCTIONS[corruption]
    extra = {"textures": load_frost_textures(frost_dir)} if corruption == "frost" else {}
    out = np.empty_like(images)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{corruption}-{severity}", unit="img", disable=None)
    try:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            rngs = [image_rng(seed, corruption, severity, int(i)) for i in indices[start:stop]]
            with np.errstate(invalid="ignore", over="ignore"):
                out[start:stop] = to_uint8(fn(images[start:stop], params, rngs, **extra))
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    return out
