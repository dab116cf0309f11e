"""Score: realism score = log softmax(observer(patch))[true class] = -cross-entropy, batched.

The observer always sees batches of exactly `score_batch` patches (the last one zero-filled), so a
patch's score does not depend on the user's batch size; scores are rounded to `decimals` so the last
bits of a kernel cannot reorder near-ties (ties are then broken by sample key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .crops import Cutter, CutRequest, image_size
from .keyed import Window
from .observer import Observer
from .records import SampleRef, ScoredPatch
from .streams import StreamBroken


class Scorer:
    def __init__(self, observer: Observer, *, mode: str, resolution: int, score_batch: int, decimals: int):
        self.observer = observer
        self.mode = mode  # "pad": centred in a zero canvas of the observer's size; "native": as is
        self.resolution = resolution
        self.score_batch = score_batch
        self.decimals = decimals

    def prepare(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC patches -> normalised NCHW observer input (padded in `pad` mode)."""
        x = self.observer.normalize(patches.permute(0, 3, 1, 2))
        if self.mode == "pad":
            h, w = x.shape[2], x.shape[3]
            top, left = (self.resolution - h) // 2, (self.resolution - w) // 2
            # zero after normalisation: the authors' pad value (the mean colour)
            x = F.pad(x, (left, self.resolution - w - left, top, self.resolution - h - top), value=0.0)
        return x

    def log_probs(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the dataset's classes, [B, C] float32 on the CPU."""
        x = torch.as_tensor(patches).to(self.observer.device)
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.score_batch):
                chunk = x[start:start + self.score_batch]
                n = chunk.shape[0]
                if n < self.score_batch:  # keep the numerical batch shape fixed
                    chunk = torch.cat([chunk, chunk.new_zeros((self.score_batch - n, *chunk.shape[1:]))])
                logits = self.observer.class_logits(self.prepare(chunk))[:n]
                out.append(torch.log_softmax(logits, dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.observer.output_index))

    def score(self, patches: np.ndarray | torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """Rounded realism scores, float64 [B]."""
        lp = self.log_probs(patches)
        picked = lp[torch.arange(lp.shape[0]), torch.as_tensor(labels, dtype=torch.long)]
        return np.round(picked.double().numpy(), self.decimals)


@dataclass
class Candidates:
    """The K candidate patches of each decodable image of a batch."""

    images: list[tuple[SampleRef, tuple[int, int], list[Window]]]  # (sample, its W x H, its K windows)
    patches: list[list[np.ndarray]]  # HWC uint8, K per image


def cut_candidates(batch: Sequence[SampleRef], read: Callable[[SampleRef], bytes], cutter: Cutter, *, seed: int,
                   crops: int, patch_size: int, window: Callable[[int, str, int, int, int], Window],
                   max_pixels: int) -> tuple[Candidates, list[tuple[SampleRef, str]]]:
    """Decode each image and cut its K windows, resized to the patch size. Returns (the candidates, the
    images rejected with their reason: `undecodable`, `too_large` when W x H from the header exceeds
    `max_pixels`, checked before anything is decoded, or `corrupt_shard` when a streamed shard broke)."""
    requests: list[CutRequest] = []
    readable: list[tuple[SampleRef, tuple[int, int], list[Window]]] = []
    rejected: list[tuple[SampleRef, str]] = []
    for ref in batch:
        try:
            encoded = read(ref)
        except StreamBroken:  # the shard's stream failed before reaching this sample
            rejected.append((ref, "corrupt_shard"))
            continue
        except OSError:
            encoded = b""
        size = image_size(encoded)
        if size is None:
            rejected.append((ref, "undecodable"))
            continue
        if size[0] * size[1] > max_pixels:
            rejected.append((ref, "too_large"))
            continue
        windows = [window(seed, ref.key, k, *size) for k in range(crops)]
        requests.append(CutRequest(encoded, windows, [(patch_size, patch_size)] * crops, size[0] * size[1]))
        readable.append((ref, size, windows))
    candidates = Candidates([], [])
    for item, patches in zip(readable, cutter.cut(requests)):
        if patches is None:
            rejected.append((item[0], "undecodable"))
        else:
            candidates.images.append(item)
            candidates.patches.append(patches)
    return candidates, rejected


def key_patches(candidates: Candidates, scorer: Scorer) -> list[ScoredPatch]:
    """Score every candidate and keep each image's best (ties: the lower crop index)."""
    if not candidates.images:
        return []
    crops = len(candidates.patches[0])
    patches = np.stack([p for ps in candidates.patches for p in ps])
    labels = np.repeat([ref.label for ref, _, _ in candidates.images], crops)
    scores = scorer.score(patches, labels).reshape(len(candidates.images), crops)
    best = []
    for (ref, size, windows), s in zip(candidates.images, scores):
        k = int(np.argmax(s))
        best.append(ScoredPatch(float(s[k]), ref.key, ref.label, ref.shard, ref.offset, ref.size, k, windows[k], size))
    return best
