"""A small class-structured synthetic image set (WebDataset shards) and a small CNN observer trained on it.

Used by the offline demo and by tests: each image is a cluttered background with one coloured shape whose
class is its shape, so most random crops carry no class information, which is the situation RDED's
patch scoring is built for. Everything is seeded; the shards are byte-identical across runs.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .models import SmallCNN
from .normalization import IMAGENET
from .source import parse_label
from .tario import Sample, walk_samples, write_bytes_atomic, write_tar

__all__ = ["SHAPES", "BAD_KINDS", "SmallCNN", "imagenet_class_counts", "make_image", "remap_labels",
           "save_torchscript", "save_weights", "train_observer", "write_imagenet_shaped", "write_synthetic_shards"]
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "bar")
BAD_KINDS = ("undecodable", "missing_label", "unknown_class", "bad_label")
JPEG_QUALITY = 90
OBSERVER_WIDTH = 16  # 3x cheaper than 32 on CPU, so ~3x more steps in the demo's minute: better accuracy

# Shape outlines in unit coordinates (radius 1 around the centre), before jitter, scaling and placement.
_ARM = 0.32
_POLYGONS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(math.cos(a), math.sin(a) + 0.2) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": [((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
              (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5) + 0.1) for k in range(10)],
    "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    "bar": [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)],
}


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int,
                  short: int) -> Callable[[], None]:
    """Thin lines and small jagged blobs, kept well below the object's size so they don't mimic it;
    returns the line drawer, for occluding the object later."""
    def clutter_line() -> None:
        pts = rng.uniform(0, 1, size=4) * (w, h, w, h)
        draw.line([float(v) for v in pts], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))

    for _ in range(int(rng.integers(6, 14))):
        clutter_line()
    for _ in range(int(rng.integers(3, 8))):
        k = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = rng.uniform(0.3, 1.0, k) * rng.uniform(0.04, 0.09) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        draw.polygon([(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(ang, rad)],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

    return clutter_line


def _render(class_index: int, num_classes: int, rng: np.random.Generator,
            size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """make_image, also returning the object's bounding box (x0, y0, x1, y1) for crop sampling."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    w, h = int(size[0]), int(size[1])
    if w < 16 or h < 16:
        raise ValueError(f"image size must be at least 16x16, got {w}x{h}")
    short = min(w, h)
    # Background: a coarse random colour field, upsampled, so colour alone says nothing about the class.
    field = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
    img = Image.fromarray(field, "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)

    clutter_line = _draw_clutter(draw, rng, w, h, short)

    # The object: extent 25-45 % of the shorter side, fully inside the image, small rotation jitter only
    # (a large one would turn squares into diamonds).
    r = rng.uniform(0.25, 0.45) * short / 2
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    luma = np.array([0.299, 0.587, 0.114])
    bg = float(field.reshape(-1, 3).mean(0) @ luma)
    colour = rng.integers(0, 256, 3)
    for _ in range(20):  # contrast with the background's mean, so the shape stays visible
        if abs(float(colour @ luma) - bg) > 70:
            break
        colour = rng.integers(0, 256, 3)
    fill = tuple(int(c) for c in colour)
    name = SHAPES[class_index]
    if name in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=fill if name == "circle" else None, outline=fill if name == "ring" else None,
                     width=max(2, int(0.32 * r)))
    else:
        t = rng.uniform(-0.17, 0.17)
        ct, st = math.cos(t), math.sin(t)
        pts = [(cx + r * (x * ct - y * st), cy + r * (x * st + y * ct)) for x, y in _POLYGONS[name]]
        draw.polygon(pts, fill=fill)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = (min(xs), min(ys), max(xs), max(ys))
    for _ in range(int(rng.integers(0, 3))):  # a little occlusion, so the object isn't always pristine
        clutter_line()
    # Pixel noise over everything (uniform integers: several times cheaper than Gaussian floats).
    amp = int(rng.integers(5, 21))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-amp, amp + 1, size=(h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    x0, y0, x1, y1 = box
    return img, (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))


def make_image(class_index: int, num_classes: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An RGB image of size (width, height): cluttered background plus one shape of class `class_index`."""
    return _render(class_index, num_classes, rng, size)[0]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_synthetic_shards(out_dir: Path, *, num_classes: int = 6, per_class: int = 60, num_shards: int = 2,
                           seed: int = 0, size_range: tuple[int, int] = (96, 160), prefix: str = "train",
                           bad_samples: Mapping[str, int] | None = None) -> list[Path]:
    """Write `{prefix}-{i:06d}.tar` shards (samples `.jpg` + `.cls`) and `classes.json`; return shard paths.

    `bad_samples` maps a kind in BAD_KINDS to a count of broken samples (keys `bad_{kind}_...`) appended to the
    last shard.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if per_class < 0 or num_shards < 1:
        raise ValueError("per_class must be >= 0 and num_shards >= 1")
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 16 <= lo <= hi, got {size_range}")
    bad = dict(bad_samples or {})
    unknown = set(bad) - set(BAD_KINDS)
    if unknown or any(n < 0 for n in bad.values()):
        raise ValueError(f"bad_samples kinds must be in {BAD_KINDS} with counts >= 0, got {bad}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def image_bytes(c: int) -> bytes:
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        return _jpeg(make_image(c, num_classes, rng, (w, h)))

    # Shuffle before cutting so every shard mixes classes; images are drawn in shuffled order from one rng.
    labels = [(c, n) for c in range(num_classes) for n in range(per_class)]
    samples = []
    for i in rng.permutation(len(labels)):
        c, n = labels[i]
        samples.append((f"s{c:02d}_{n:05d}", {"jpg": image_bytes(c), "cls": str(c).encode()}))
    shards = [[samples[i] for i in part] for part in np.array_split(np.arange(len(samples)), num_shards)]

    bad_cls = {"unknown_class": str(num_classes + 5).encode(), "bad_label": b"dog"}
    for kind in BAD_KINDS:  # fixed order, independent of the mapping's order
        for j in range(bad.get(kind, 0)):
            c = j % num_classes
            # Undecodable: no image format's magic, and 'h' as byte 1 also fails PIL's header-less TGA check.
            members = {"jpg": b"this is not an image\n" * 8 if kind == "undecodable" else image_bytes(c),
                       "cls": bad_cls.get(kind, str(c).encode())}
            if kind == "missing_label":
                del members["cls"]
            shards[-1].append((f"bad_{kind}_{j:05d}", members))

    paths = [out_dir / f"{prefix}-{i:06d}.tar" for i in range(num_shards)]
    for path, shard in zip(paths, shards):
        write_tar(path, shard)
    classes = [{"index": i, "name": SHAPES[i]} for i in range(num_classes)]
    write_bytes_atomic(out_dir / "classes.json", (json.dumps(classes, indent=2) + "\n").encode())
    return paths


IMAGENET_TRAIN_SAMPLES = 1_281_167


def imagenet_class_counts(samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Samples per class shaped like ImageNet-1K's train split: most classes full, some short (ImageNet
    has 732-1,300 per class), summing to exactly `samples`."""
    full = math.ceil(samples / num_classes / 0.985)  # the shortfall: 1.5 % of the samples
    counts = np.full(num_classes, full, np.int64)
    deficit = int(counts.sum()) - samples
    rng = np.random.default_rng([seed, 7])
    short = rng.permutation(num_classes)[:max(1, num_classes // 10)]  # a tenth of the classes are short
    for i, c in enumerate(short):
        take = deficit // len(short) + (1 if i < deficit % len(short) else 0)
        counts[c] -= min(take, int(counts[c]))
    if int(counts.sum()) != samples:  # only when the short classes cannot absorb the deficit
        raise ValueError(f"cannot spread {samples} samples over {num_classes} classes")
    return counts


def write_imagenet_shaped(out_dir: Path, *, samples: int = IMAGENET_TRAIN_SAMPLES, num_shards: int = 1024,
                          num_classes: int = 1000, seed: int = 0, pool_size: int = 1024,
                          size_range: tuple[int, int] = (32, 96), log: Callable[[str], None] | None = None
                          ) -> list[Path]:
    """Shards shaped like ImageNet-1K for scale tests: `samples` samples of `num_classes` classes
    (imagenet_class_counts), shuffled across `num_shards` shards of near-equal size, keys like ImageNet's
    (`c{class}_{n}`), labels as `.cls`. Images are drawn from a pool of `pool_size` small JPEGs of varied
    sizes, so writing a million samples costs seconds of encoding and a few GB of disk."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda _msg: None)
    rng = np.random.default_rng(seed)
    lo, hi = size_range
    pool = [_jpeg(make_image(i % len(SHAPES), len(SHAPES), rng, tuple(int(v) for v in rng.integers(lo, hi + 1, 2))))
            for i in range(pool_size)]
    counts = imagenet_class_counts(samples, num_classes, seed)
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = rng.permutation(samples)  # sample id -> place in the shuffled stream
    picks = rng.integers(0, pool_size, samples)
    paths = [out_dir / f"train-{i:06d}.tar" for i in range(num_shards)]
    for shard_no, (path, ids) in enumerate(zip(paths, np.array_split(order, num_shards))):
        classes = np.searchsorted(starts, ids, side="right") - 1

        def members(ids=ids, classes=classes):
            for sample_id, c in zip(ids.tolist(), classes.tolist()):
                yield (f"c{c:04d}_{sample_id - int(starts[c]):05d}",
                       {"jpg": pool[picks[sample_id]], "cls": str(c).encode()})
        write_tar(path, members())
        if (shard_no + 1) % 64 == 0:
            log(f"{shard_no + 1}/{num_shards} shards written")
    return paths


def remap_labels(src: Path, dst: Path, mapping: Mapping[int, int]) -> None:
    """A copy of shard `src` at `dst` with every `.cls` label in `mapping` replaced (e.g. data-set indices
    written as ImageNet indices; a label is read as the job reads it); all else unchanged but extensions,
    which come out lower-cased. Labels not in `mapping` and members that are not labels are copied as they
    are."""
    with open(src, "rb") as f:
        samples = []
        for item in walk_samples(f):
            if not isinstance(item, Sample):
                raise OSError(f"{src}: the tar file breaks off at {item.key}")
            members = {}
            for m in item.members:
                data = m.data
                if m.ext == "cls" and (label := parse_label(data)) in mapping:
                    data = str(mapping[label]).encode()
                members[m.ext] = data
            samples.append((item.key, members))
    write_tar(Path(dst), samples)


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays of one size -> float NCHW normalised with ImageNet mean/std (the scorer's rule)."""
    return IMAGENET(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def _object_crop(rng: np.random.Generator, w: int, h: int, box: tuple[float, float, float, float],
                 min_cover: float = 0.7) -> tuple[float, float, float, float]:
    """A RandomResizedCrop-style square box (area 8-100 %) that holds >= min_cover of the object's box."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for _ in range(30):  # rejection keeps the crop distribution close to the one used at scoring time
        s = math.sqrt(rng.uniform(0.08, 1.0) * w * h)
        if s > min(w, h):
            continue
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        iw = max(0.0, min(x + s, box[2]) - max(x, box[0]))
        ih = max(0.0, min(y + s, box[3]) - max(y, box[1]))
        if iw * ih >= min_cover * area:
            return (x, y, x + s, y + s)
    s = float(min(w, h))  # fallback: the largest square, slid over the object
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x, y = min(max(cx - s / 2, 0.0), w - s), min(max(cy - s / 2, 0.0), h - s)
    return (x, y, x + s, y + s)


def _batch(pool: list, idx: np.ndarray, rng: np.random.Generator, resolution: int, factor: int,
           crop_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop_frac share of padded object crops (like scored patches), the rest whole images resized."""
    inner = max(1, resolution // factor)
    lo = (resolution - inner) // 2
    wholes, crops, yw, yc = [], [], [], []
    for i in idx:
        img, box, label = pool[i]
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)  # all shapes are mirror-symmetric left/right
            box = (img.width - box[2], box[1], img.width - box[0], box[3])
        if rng.random() < crop_frac:
            crop = _object_crop(rng, img.width, img.height, box)
            crops.append(np.asarray(img.resize((inner, inner), Image.BILINEAR, box=crop)))
            yc.append(label)
        else:
            wholes.append(np.asarray(img.resize((resolution, resolution), Image.BILINEAR)))
            yw.append(label)
    xs = []
    if wholes:
        xs.append(_to_tensor(wholes))
    if crops:  # zero padding after normalisation, exactly as the scorer pads patches
        xs.append(F.pad(_to_tensor(crops), (lo, resolution - inner - lo, lo, resolution - inner - lo)))
    return torch.cat(xs), torch.tensor(yw + yc)


def _make_pool(num_classes: int, n: int, rng: np.random.Generator) -> list:
    """n class-balanced images, JPEG round-tripped like the shards, with their object boxes and labels."""
    pool = []
    for i in range(n):
        c = i % num_classes
        w, h = (int(v) for v in rng.integers(96, 161, size=2))
        img, box = _render(c, num_classes, rng, (w, h))
        pool.append((Image.open(io.BytesIO(_jpeg(img))).convert("RGB"), box, c))
    return pool


def train_observer(num_classes: int, *, resolution: int = 64, factor: int = 2, steps: int = 600, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> SmallCNN:
    """Train a SmallCNN on synthetic images for a fixed number of steps: a pure function of its arguments
    (on one machine: CPU kernels are deterministic for a fixed thread count).

    Batches mix whole images resized to `resolution` with RandomResizedCrop patches that contain most of the
    object, resized to resolution // factor and zero-padded to `resolution`. The model has width OBSERVER_WIDTH.
    Returns it in eval mode; held-out accuracy is reported through `log`.
    """
    log = log or (lambda _msg: None)
    rng = np.random.default_rng(seed)
    pool = _make_pool(num_classes, min(2000, max(64, 4 * steps)), rng)  # ~3 s at most
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = SmallCNN(num_classes, width=OBSERVER_WIDTH)
    base_lr, batch_size = 3e-3, 64
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=5e-4)
    model.train()
    for step in range(steps):
        # 30-step warm-up, then cosine decay to zero at the last step
        lr = base_lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = _batch(pool, rng.integers(0, len(pool), batch_size), rng, resolution, factor, crop_frac=0.5)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    held = _make_pool(num_classes, 200, np.random.default_rng([seed, 1]))
    with torch.no_grad():
        accs = []
        for crop_frac in (0.0, 1.0):
            x, y = _batch(held, np.arange(len(held)), np.random.default_rng([seed, 2]), resolution, factor,
                          crop_frac)
            accs.append((model(x).argmax(1) == y).float().mean().item())
    log(f"observer: {steps} steps of {batch_size}, held-out accuracy {accs[0]:.1%} on whole images, "
        f"{accs[1]:.1%} on padded object crops ({num_classes} classes)")
    return model


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Save `model`'s state dict atomically at `path` (observer kind `small-cnn` reads it back)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_bytes_atomic(Path(path), buf.getvalue())


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    """Save `model` as TorchScript (scripted, so input sizes stay free) atomically at `path`."""
    model.eval()
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of export, but loads anywhere with no code
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.script(model)
        except Exception:  # tracing fixes shapes only for size-dependent Python code, which SmallCNN has none of
            module = torch.jit.trace(model, torch.zeros(1, 3, 64, 64))
        buf = io.BytesIO()
        torch.jit.save(module, buf)
    write_bytes_atomic(Path(path), buf.getvalue())
