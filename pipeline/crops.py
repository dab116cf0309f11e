"""Crop windows (pure functions of seed, key, crop index and image size) and the DALI decode + cut stage.

Each image is decoded once; its K windows are sliced out and resized (antialiased) in the same DALI
pipeline. The decoder runs on the GPU (`mixed`) when CUDA is present, on the CPU otherwise.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .select import keyed_uniform

Window = tuple[int, int, int, int]  # x, y, w, h in source pixels

MIN_AREA, MAX_AREA = 0.08, 1.0


def random_resized_crop(seed: int, parts: tuple, width: int, height: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> Window:
    """torchvision's RandomResizedCrop.get_params, drawn from keyed uniforms of (seed, *parts) instead
    of a global RNG: the same 10 tries (area uniform in scale, log-ratio uniform in ratio) and the same
    centre-crop fallback."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        u_area, u_ratio, u_x, u_y = (keyed_uniform(seed, *parts, attempt, what) for what in "arxy")
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio) if ratio[0] != ratio[1] else ratio[0]
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(u_x * (width - w + 1)), int(u_y * (height - h + 1)), w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return ((width - w) // 2, (height - h) // 2, w, h)


def crop_window(seed: int, key: str, crop_index: int, width: int, height: int) -> Window:
    """Candidate patch `crop_index` of an image: a square RandomResizedCrop with area 8-100 %."""
    return random_resized_crop(seed, ("crop", key, crop_index), width, height, (MIN_AREA, MAX_AREA), (1.0, 1.0))


def centre_square(seed: int, key: str, crop_index: int, width: int, height: int) -> Window:
    """The largest centred square: a whole real image, for the random-subset baseline."""
    side = min(width, height)
    return ((width - side) // 2, (height - side) // 2, side, side)


def image_size(encoded: bytes) -> tuple[int, int] | None:
    """(W, H) from the image header alone, or None when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(encoded)) as im:
            return im.size
    except Exception:  # Pillow raises many types for garbage input
        return None


@dataclass(frozen=True, slots=True)
class CutRequest:
    """One image and the windows to cut from it, each resized to its own (w, h)."""

    encoded: bytes
    windows: Sequence[Window]
    sizes: Sequence[tuple[int, int]]


class Cutter:
    """Decodes images and cuts `crops_per_image` windows from each, with DALI.

    Results do not depend on `batch_size` or `num_threads`: every operation is per sample.
    A batch that DALI cannot decode is retried one image at a time, so one bad image costs only itself.
    """

    def __init__(self, crops_per_image: int, *, batch_size: int, num_threads: int, decoder: str,
                 device_id: int | None):
        self.crops_per_image = crops_per_image
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.decoder = decoder  # "cpu" or "mixed"
        self.device_id = device_id
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        k_crops = self.crops_per_image
        decoder_device = "mixed" if self.decoder == "mixed" else "cpu"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def cut_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
            outputs = []
            for k in range(k_crops):
                anchor = fn.external_source(name=f"anchor{k}", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name=f"shape{k}", dtype=types.FLOAT, ndim=1)
                size = fn.external_source(name=f"size{k}", dtype=types.FLOAT, ndim=1)
                patch = fn.slice(image, anchor, shape, axis_names="WH", normalized_anchor=False,
                                 normalized_shape=False, out_of_bounds_policy="error")
                outputs.append(fn.resize(patch, size=size, antialias=True, interp_type=types.INTERP_LINEAR))
            return tuple(outputs)

        pipe = cut_pipeline()
        pipe.build()
        return pipe

    def _run(self, requests: Sequence[CutRequest]) -> list[list[np.ndarray]]:
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        pipe.feed_input("encoded", [np.frombuffer(r.encoded, dtype=np.uint8) for r in requests])
        for k in range(self.crops_per_image):
            pipe.feed_input(f"anchor{k}", [np.array(r.windows[k][:2], np.float32) for r in requests])
            pipe.feed_input(f"shape{k}", [np.array(r.windows[k][2:], np.float32) for r in requests])
            # DALI's resize size is (h, w) for HWC images
            pipe.feed_input(f"size{k}", [np.array(r.sizes[k][::-1], np.float32) for r in requests])
        outs = pipe.run()
        per_crop = [_to_numpy(o) for o in outs]
        return [[per_crop[k][i] for k in range(self.crops_per_image)] for i in range(len(requests))]

    def cut(self, requests: Sequence[CutRequest]) -> list[list[np.ndarray] | None]:
        """HWC uint8 patches per request (one per window), or None for an image DALI cannot decode."""
        results: list[list[np.ndarray] | None] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            try:
                results.extend(self._run(chunk))
            except RuntimeError:
                self._pipe = None  # a pipeline that raised is not reused
                for r in chunk:
                    try:
                        results.extend(self._run([r]))
                    except RuntimeError:
                        self._pipe = None
                        results.append(None)
        return results


def _to_numpy(tensor_list) -> list[np.ndarray]:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return [np.array(tensor_list[i]) for i in range(len(tensor_list))]
