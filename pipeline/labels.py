"""The soft-label codec: compact, pickle-free records readable with numpy and zstandard alone.

Each record is a numpy structured array saved as .npy and compressed with zstandard. A label is the
observer's log-probabilities over the data set's classes, shifted so the largest is 0, in float16:
all classes when there are at most `topk`, else the top `topk` (with their class indices) plus one
`rest` value, the log-probability every other class gets when the remaining mass is spread evenly.
"""

from __future__ import annotations

import io

import numpy as np
import zstandard

LABELS_FORMAT = "rded-soft-labels/1"
ZSTD_LEVEL = 19


def label_fields(num_classes: int, topk: int) -> list[tuple]:
    k = min(topk, num_classes)
    if k == num_classes:
        return [("logit", "<f2", (num_classes,))]
    return [("index", "<u2", (k,)), ("logit", "<f2", (k,)), ("rest", "<f2")]


def view_dtype(factor: int, num_classes: int, topk: int) -> np.dtype:
    return np.dtype([("view", "<u2"), ("col_perm", "u1", (factor,)), ("row_perm", "u1", (factor,)),
                     ("crop", "<u2", (4,)), ("flip", "u1")] + label_fields(num_classes, topk))


def region_dtype(num_classes: int, topk: int) -> np.dtype:
    return np.dtype([("cell", "u1")] + label_fields(num_classes, topk))


def pack_labels(records: np.ndarray, log_probs: np.ndarray) -> None:
    """Fill the label fields of `records` from exact log-probabilities [n, C] (float32)."""
    num_classes = log_probs.shape[1]
    shifted = log_probs - log_probs.max(axis=1, keepdims=True)
    if "index" not in records.dtype.names:
        records["logit"] = shifted.astype(np.float16)
        return
    k = records.dtype["index"].shape[0]
    # stable sort, so equal values keep class order and the record is deterministic
    order = np.argsort(-shifted, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(shifted, order, axis=1)
    records["index"] = order
    records["logit"] = top.astype(np.float16)
    # probabilities relative to the top class: sum of all = exp(logsumexp(shifted))
    total = np.exp(shifted.astype(np.float64)).sum(axis=1)
    rest_mass = total - np.exp(top.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        records["rest"] = np.log(np.maximum(rest_mass, 0.0) / (num_classes - k)).astype(np.float16)


def unpack_logits(records: np.ndarray, num_classes: int) -> np.ndarray:
    """Reconstructed logits [n, C] float32 (any shift of the log-probabilities)."""
    if "index" not in records.dtype.names:
        return records["logit"].astype(np.float32)
    out = np.repeat(records["rest"].astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(out, records["index"].astype(np.int64), records["logit"].astype(np.float32), axis=1)
    return out


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray, temperature: float) -> np.ndarray:
    """KL(softmax(p/T) || softmax(q/T)) per row, in nats."""
    p = softmax(p_logits, temperature).astype(np.float64)
    log_p = np.log(np.where(p > 0, p, 1.0))
    q = softmax(q_logits, temperature).astype(np.float64)
    log_q = np.log(np.maximum(q, 1e-300))
    return np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=-1)


def encode_records(records: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, records, allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buf.getvalue())


def decode_records(data: bytes) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(data)
    return np.load(io.BytesIO(raw), allow_pickle=False)
