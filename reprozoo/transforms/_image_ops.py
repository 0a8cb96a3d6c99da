"""The image operations of scikit-image, SciPy, OpenCV and ImageMagick that the CIFAR-10-C script calls,
re-derived with numpy (see :mod:`reprozoo.transforms.corruptions` for what was checked against what). Images are
batched: (N, H, W) or (N, H, W, C); filters act on axes 1 (rows) and 2 (columns)."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32  # CIFAR images are 32x32: the default size of the zoom taps


# scipy.ndimage / OpenCV border modes as numpy.pad modes
PAD = {"nearest": "edge", "reflect": "symmetric", "reflect101": "reflect", "constant": "constant"}


def correlate_axis(x: np.ndarray, weights: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """``out[i] = sum_j weights[j] * x[i + j - r]`` along ``axis`` (odd ``len(weights) = 2r + 1``), outside
    values from ``mode``; float64."""
    r = len(weights) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode=PAD[mode]) if r else x
    n = x.shape[axis]
    out = np.zeros(x.shape, dtype=np.float64)
    for j, w in enumerate(weights):
        if w != 0:
            index = [slice(None)] * x.ndim
            index[axis] = slice(j, j + n)
            out += w * padded[tuple(index)]
    return out


def correlate2d(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """2-D correlation centred on the middle of the odd-sized ``kernel``, on axes 1 and 2; float64."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    pad = [(0, 0)] * x.ndim
    pad[1], pad[2] = (rh, rh), (rw, rw)
    padded = np.pad(x, pad, mode=PAD[mode])
    h, w = x.shape[1:3]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j] != 0:
                out += float(kernel[i, j]) * padded[:, i : i + h, j : j + w]
    return out


def gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, weights summing to 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * t**2)
    return phi / phi.sum()


def correlate_axis_symmetric(x: np.ndarray, weights: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """``correlate_axis`` for a symmetric kernel, summed in scipy.ndimage.correlate1d's order
    (``x[i] * w[0] + sum_{j=r..1} (x[i - j] + x[i + j]) * w[j]``) so that float results match it bit for bit."""
    r = len(weights) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode=PAD[mode]) if r else x
    n = x.shape[axis]

    def shifted(k):
        index = [slice(None)] * x.ndim
        index[axis] = slice(r + k, r + k + n)
        return padded[tuple(index)]

    out = shifted(0) * weights[r]
    for k in range(r, 0, -1):
        out = out + (shifted(-k) + shifted(k)) * weights[r - k]
    return out


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian (scipy's gaussian_filter) over rows and columns only (``multichannel``); the
    defaults are skimage's. sigma ~ 0 leaves the image as it is, as scipy does. float32 input stays float32,
    rounded after each axis as scipy stores it; anything else is float64."""
    x = np.asarray(x)
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    if sigma <= 1e-15:
        return x.astype(dtype)
    weights = gaussian_weights(sigma, truncate)
    for axis in (1, 2):
        x = correlate_axis_symmetric(x.astype(np.float64), weights, axis, mode).astype(dtype)
    return x


def gray(x: np.ndarray) -> np.ndarray:
    """OpenCV's RGB2GRAY of float32 images (N, H, W, 3) -> (N, H, W): 0.299 R + 0.587 G + 0.114 B, rounded as
    its x86 SIMD path does (fused multiply-adds: fma(B, 0.114, fma(R, 0.299, G * 0.587)))."""
    x = np.asarray(x, dtype=np.float32)
    cr, cg, cb = (np.float64(np.float32(v)) for v in (0.299, 0.587, 0.114))
    green = x[..., 1] * np.float32(cg)
    red_green = (x[..., 0].astype(np.float64) * cr + green.astype(np.float64)).astype(np.float32)
    return (x[..., 2].astype(np.float64) * cb + red_green.astype(np.float64)).astype(np.float32)


def rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv of float images in [0, 1], batched (N, H, W, 3)."""
    v = rgb.max(-1)
    delta = rgb.max(-1) - rgb.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        h = np.zeros_like(v)
        for channel, base, a, b in ((0, 0.0, 1, 2), (1, 2.0, 2, 0), (2, 4.0, 0, 1)):  # later maxima win, as there
            is_max = rgb[..., channel] == v
            h = np.where(is_max, base + (rgb[..., a] - rgb[..., b]) / delta, h)
        h = (h / 6.0) % 1.0
    h = np.where(delta == 0, 0.0, h)
    h[np.isnan(h)] = 0
    return np.stack([h, s, v], axis=-1)


def hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb, batched (N, H, W, 3)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    hi = hi.astype(np.uint8) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float64)
    for k, (r, g, b) in enumerate(choices):
        sel = hi == k
        out[..., 0] = np.where(sel, r, out[..., 0])
        out[..., 1] = np.where(sel, g, out[..., 1])
        out[..., 2] = np.where(sel, b, out[..., 2])
    return out


def zoom_taps(zoom: float, size: int = IMAGE_SIZE) -> tuple[np.ndarray, ...]:
    """The script's ``clipped_zoom`` along one axis: crop the central ``ceil(size / zoom)`` pixels, zoom them
    with scipy.ndimage.zoom(order=1), keep the central ``size``. Returns, per output pixel, the two source
    pixels and their linear weights."""
    ch = int(np.ceil(size / zoom))
    top = (size - ch) // 2
    out_size = int(round(ch * zoom))  # scipy: int(round(n * zoom)), Python's rounding
    ratio = (ch - 1) / (out_size - 1) if out_size > 1 else 0.0
    trim = (out_size - size) // 2
    coord = (trim + np.arange(size)) * ratio
    i0 = np.minimum(np.floor(coord).astype(np.int64), ch - 1)
    w0 = 1.0 - (coord - i0)
    return top + i0, top + np.minimum(i0 + 1, ch - 1), w0, 1.0 - w0  # scipy: the last weight is 1 - the others


def zoom_last(x: np.ndarray, zoom: float) -> np.ndarray:
    """clipped_zoom of images laid out (H, W, K) (batch and channels last, so that gathers copy whole rows),
    float64, summed in scipy's order (taps (0,0), (0,1), (1,0), (1,1), each value times the row weight, then the
    column weight) so that results match it bit for bit."""
    r0, r1, wr0, wr1 = zoom_taps(zoom, x.shape[0])
    c0, c1, wc0, wc1 = zoom_taps(zoom, x.shape[1])
    out = None
    for r, wr in ((r0, wr0), (r1, wr1)):
        rows = x[r] * wr[:, None, None]
        for c, wc in ((c0, wc0), (c1, wc1)):
            term = rows[:, c] * wc[None, :, None]
            out = term if out is None else out + term
    return out


def to_last(x: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) -> contiguous (H, W, N * C)."""
    return np.ascontiguousarray(np.moveaxis(x, 0, 2).reshape(x.shape[1], x.shape[2], -1))


def from_last(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, h, w = shape[:3]
    return np.moveaxis(y.reshape((h, w, n) + tuple(shape[3:])), 2, 0)


def apply_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """clipped_zoom of a batch (N, H, W[, C]), float64 (see :func:`zoom_last`)."""
    x = np.asarray(x, dtype=np.float64)
    return from_last(zoom_last(to_last(x), zoom), x.shape)


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage of uint8 images (N, H, W[, C]), one angle (degrees) per image; uint8 out.
    As ImageMagick 6 Q16 does it (checked bit for bit against 6.9.11-60 Q16 through PNG files, as the script
    round-trips): 8-bit values scaled to 16-bit quanta (x 257), the weighted sum rounded to a quantum, then
    written to the 8-bit PNG as ``quantum // 257``."""
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(i * i) / (2.0 * sigma * sigma)) / (np.sqrt(2 * np.pi) * sigma)
    kernel /= kernel.sum()
    rad = np.pi * np.asarray(angles, dtype=np.float64) / 180.0
    px, py = width * np.sin(rad), width * np.cos(rad)
    norm = np.hypot(px, py)
    off_x = np.ceil(i[None, :] * py[:, None] / norm[:, None] - 0.5).astype(np.int64)  # (N, width): columns
    off_y = np.ceil(i[None, :] * px[:, None] / norm[:, None] - 0.5).astype(np.int64)  # rows
    n, h, w = x.shape[:3]
    rows, cols = np.arange(h), np.arange(w)
    batch = np.arange(n)[:, None, None]
    acc = np.zeros(x.shape, dtype=np.float64)
    for k in range(width):
        r = np.clip(rows[None, :] + off_y[:, k, None], 0, h - 1)[:, :, None]  # edge pixels repeat outside
        c = np.clip(cols[None, :] + off_x[:, k, None], 0, w - 1)[:, None, :]
        acc += kernel[k] * (x[batch, r, c] * 257.0)
    quanta = np.clip(np.floor(acc + 0.5), 0, 65535).astype(np.int64)
    return (quanta // 257).astype(np.uint8)


def wrap_uint8(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.uint8)`` of non-negative floats as numpy does it on x86 (truncate, keep the low 8 bits),
    made explicit so that it does not depend on the platform."""
    return (np.floor(x).astype(np.int64) & 0xFF).astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """The script's final ``np.uint8(...)`` of values it already clipped to [0, 255]: truncation; a NaN (0 / 0 in
    spatter) becomes 0 as on x86."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    x = np.nan_to_num(x.astype(np.float64), nan=0.0)
    return np.clip(x, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- OpenCV pieces


def cv_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    t = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(t * t) / (2 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """The script's anti-aliased disk: a normalised aliased disk on a 17x17 grid (radius <= 8), blurred by
    cv2.GaussianBlur (3x3, sigma ``alias_blur``, reflect-101 border); float32."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-int(radius), int(radius) + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = np.asarray(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    k = cv_gaussian_kernel(ksize, alias_blur)
    blurred = correlate_axis(correlate_axis(disk[None], k, 1, "reflect101"), k, 2, "reflect101")
    return blurred[0].astype(np.float32)


def crop_kernel(kernel: np.ndarray) -> np.ndarray:
    """The centred, odd-sized part of ``kernel`` outside which it is zero (same correlation, fewer taps)."""
    c = kernel.shape[0] // 2
    nz = np.argwhere(kernel != 0)
    r = int(np.abs(nz - c).max()) if len(nz) else 0
    return kernel[c - r : c + r + 1, c - r : c + r + 1]


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform: the 2x3 M with M @ (x, y, 1) = dst for three (x, y) points; float64."""
    a = np.zeros((6, 6))
    b = np.zeros(6)
    for k in range(3):
        x, y = float(src[k, 0]), float(src[k, 1])
        a[2 * k, :3] = (x, y, 1)
        a[2 * k + 1, 3:] = (x, y, 1)
        b[2 * k], b[2 * k + 1] = float(dst[k, 0]), float(dst[k, 1])
    return np.linalg.solve(a, b).reshape(2, 3)


def reflect101(p: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 index mapping (gfedcb|abcdefgh|gfedcba), for |overshoot| < n."""
    p = np.where(p < 0, -p, p)
    return np.where(p >= n, 2 * n - p - 2, p)


def warp_affine(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(x, M, (w, h)) with INTER_LINEAR and BORDER_REFLECT_101, one M per image (N, 2, 3), x float32
    (N, H, W, C). Reproduces OpenCV's fixed point: source coordinates rounded to 1/32 pixel (AB_BITS = 10,
    INTER_BITS = 5) and float32 bilinear weights of the 32-step table."""
    n, h, w = x.shape[:3]
    m = matrices.astype(np.float64)
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    det = np.where(det != 0, 1.0 / np.where(det != 0, det, 1.0), 0.0)
    a11, a22 = m[:, 1, 1] * det, m[:, 0, 0] * det
    a12, a21 = -m[:, 0, 1] * det, -m[:, 1, 0] * det
    b1 = -a11 * m[:, 0, 2] - a12 * m[:, 1, 2]
    b2 = -a21 * m[:, 0, 2] - a22 * m[:, 1, 2]
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    scale, round_delta = 1024, 16
    adelta = np.rint(a11[:, None] * xs[None] * scale).astype(np.int64)  # (N, W)
    bdelta = np.rint(a21[:, None] * xs[None] * scale).astype(np.int64)
    x0 = np.rint((a12[:, None] * ys[None] + b1[:, None]) * scale).astype(np.int64) + round_delta  # (N, H)
    y0 = np.rint((a22[:, None] * ys[None] + b2[:, None]) * scale).astype(np.int64) + round_delta
    big_x = (x0[:, :, None] + adelta[:, None, :]) >> 5  # (N, H, W), in 1/32 pixels
    big_y = (y0[:, :, None] + bdelta[:, None, :]) >> 5
    ix, fx = big_x >> 5, (big_x & 31).astype(np.float32) * np.float32(1 / 32)
    iy, fy = big_y >> 5, (big_y & 31).astype(np.float32) * np.float32(1 / 32)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float32)
    for dy, wy in ((0, np.float32(1) - fy), (1, fy)):
        for dx, wx in ((0, np.float32(1) - fx), (1, fx)):
            tap = x[batch, reflect101(iy + dy, h), reflect101(ix + dx, w)]
            weight = (wy * wx).astype(np.float32)
            out += tap * (weight[..., None] if x.ndim == 4 else weight)
    return out


def map_coordinates_reflect(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """scipy.ndimage.map_coordinates(order=1, mode="reflect") of each channel of x (N, H, W, C) at per-image
    coordinates rows/cols (N, H, W); 'reflect' is half-sample symmetric (dcba|abcd|dcba)."""
    n, h, w = x.shape[:3]

    def sym(p, size):
        p = np.where(p < 0, -p - 1, p)
        return np.where(p >= size, 2 * size - p - 1, p)

    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            out += x[batch, sym(r0 + dr, h), sym(c0 + dc, w)] * (wr * wc)[..., None]
    return out


def box3(x: np.ndarray) -> np.ndarray:
    """cv2.blur(x, (3, 3)) sums (reflect-101 border), float64, before OpenCV's per-type rounding."""
    ones = np.ones(3)
    return correlate_axis(correlate_axis(x.astype(np.float64), ones, 1, "reflect101"), ones, 2, "reflect101")


TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # OpenCV canny.cpp


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(img, low, high) of uint8 images (N, H, W), aperture 3, L1 gradient: bool edges."""
    p = np.pad(img.astype(np.int32), ((0, 0), (1, 1), (1, 1)), mode="edge")  # Sobel with BORDER_REPLICATE
    dx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    dy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    lo, hi = int(np.floor(low)), int(np.floor(high))
    m = np.pad(mag, ((0, 0), (1, 1), (1, 1)))  # magnitudes outside the image are 0

    def at(drow, dcol):
        h, w = mag.shape[1:]
        return m[:, 1 + drow : 1 + drow + h, 1 + dcol : 1 + dcol + w]

    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << 15
    tg22x = ax * TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # s = 1: the diagonal through (row-1, col-1) and (row+1, col+1)
    keep = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)), False)
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    candidate = keep & (mag > lo)
    edges = candidate & (mag > hi)
    while True:  # hysteresis: candidates 8-connected to a strong edge
        g = np.pad(edges, ((0, 0), (1, 1), (1, 1)))
        h, w = edges.shape[1:]
        grown = np.zeros_like(edges)
        for drow in (-1, 0, 1):
            for dcol in (-1, 0, 1):
                grown |= g[:, 1 + drow : 1 + drow + h, 1 + dcol : 1 + dcol + w]
        new = edges | (grown & candidate)
        if np.array_equal(new, edges):
            return edges
        edges = new


def distance_transform_5x5(nonzero: np.ndarray) -> np.ndarray:
    """cv2.distanceTransform(src, DIST_L2, 5) for bool images (True = nonzero): the two raster passes of the 5x5
    chamfer mask with the weights 1, 1.4 and 2.1969 added in float32, which is what the OpenCV pip wheels return
    (measured; OpenCV's generic C++ path sums in 16-bit fixed point instead, within 3e-5 of this); outside the
    image is infinitely far. float32 (N, H, W)."""
    hv, diag, long_ = np.float32(1.0), np.float32(1.4), np.float32(2.1969)
    far = np.float32(1e20)
    n, h, w = nonzero.shape
    t = np.full((n, h + 4, w + 4), far, dtype=np.float32)
    for i in range(h):  # forward pass: rows above, then left to right
        r = i + 2
        a = np.minimum.reduce(
            [
                t[:, r - 2, 1 : w + 1] + long_,  # (i-2, j-1)
                t[:, r - 2, 3 : w + 3] + long_,  # (i-2, j+1)
                t[:, r - 1, 0:w] + long_,  # (i-1, j-2)
                t[:, r - 1, 1 : w + 1] + diag,
                t[:, r - 1, 2 : w + 2] + hv,
                t[:, r - 1, 3 : w + 3] + diag,
                t[:, r - 1, 4 : w + 4] + long_,  # (i-1, j+2)
            ]
        )
        a = np.where(nonzero[:, i], np.minimum(a, far), np.float32(0))
        for j in range(w):
            t[:, r, j + 2] = np.minimum(a[:, j], t[:, r, j + 1] + hv)
    for i in range(h - 1, -1, -1):  # backward pass: rows below, then right to left
        r = i + 2
        b = np.minimum.reduce(
            [
                t[:, r, 2 : w + 2],
                t[:, r + 2, 3 : w + 3] + long_,  # (i+2, j+1)
                t[:, r + 2, 1 : w + 1] + long_,  # (i+2, j-1)
                t[:, r + 1, 4 : w + 4] + long_,  # (i+1, j+2)
                t[:, r + 1, 3 : w + 3] + diag,
                t[:, r + 1, 2 : w + 2] + hv,
                t[:, r + 1, 1 : w + 1] + diag,
                t[:, r + 1, 0:w] + long_,  # (i+1, j-2)
            ]
        )
        for j in range(w - 1, -1, -1):
            t[:, r, j + 2] = np.minimum(b[:, j], t[:, r, j + 3] + hv)
    return t[:, 2 : h + 2, 2 : w + 2].copy()


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist of uint8 images (N, H, W)."""
    n = img.shape[0]
    flat = img.reshape(n, -1)
    total = flat.shape[1]
    hist = np.stack([np.bincount(row, minlength=256) for row in flat])
    out = np.empty_like(flat)
    for k in range(n):
        first = int(np.flatnonzero(hist[k])[0])
        if hist[k, first] == total:
            out[k] = first
            continue
        scale = np.float32(255.0) / np.float32(total - hist[k, first])
        lut = np.zeros(256, dtype=np.uint8)
        sums = np.cumsum(hist[k, first + 1 :]).astype(np.float32)
        lut[first + 1 :] = np.clip(np.rint(sums * scale), 0, 255).astype(np.uint8)
        out[k] = lut[flat[k]]
    return out.reshape(img.shape)
