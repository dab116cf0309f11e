"""Decode + crop, with DALI: each image is decoded once and its windows are sliced out and resized
(antialiased) in the same pipeline. The decoder runs on the GPU (`mixed`) when CUDA is present, on the
CPU otherwise. The windows themselves are pure functions (rded.keyed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .keyed import Window


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
    pixels: int = 0  # W x H of the source image (from its header): what decoding it costs


class Cutter:
    """Decodes images and cuts `crops_per_image` windows from each, with DALI.

    Results do not depend on `batch_size`, `max_batch_pixels` or `num_threads`: every operation is per
    sample. A batch holds at most `batch_size` images and `max_batch_pixels` source pixels (an image
    larger than that goes alone), so decode memory is bounded by the settings, not by the data. A batch
    that DALI cannot decode is retried one image at a time, so one bad image costs only itself.
    """

    def __init__(self, crops_per_image: int, *, batch_size: int, num_threads: int, decoder: str,
                 device_id: int | None, max_batch_pixels: int | None = None):
        self.crops_per_image = crops_per_image
        self.batch_size = batch_size
        self.max_batch_pixels = max_batch_pixels
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

    def _batches(self, requests: Sequence[CutRequest]) -> list[Sequence[CutRequest]]:
        batches: list[list[CutRequest]] = []
        pixels = 0
        for r in requests:
            full = batches and (len(batches[-1]) == self.batch_size or
                                (self.max_batch_pixels is not None and pixels + r.pixels > self.max_batch_pixels))
            if not batches or full:
                batches.append([])
                pixels = 0
            batches[-1].append(r)
            pixels += r.pixels
        return batches

    def cut(self, requests: Sequence[CutRequest]) -> list[list[np.ndarray] | None]:
        """HWC uint8 patches per request (one per window), or None for an image DALI cannot decode."""
        results: list[list[np.ndarray] | None] = []
        for chunk in self._batches(requests):
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
