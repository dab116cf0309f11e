"""The soft-label codec: compact, pickle-free records readable with numpy and zstandard alone.

Each record is a numpy structured array saved as .npy and compressed with zstandard. A label is the
observer's log-probabilities over the data set's classes, shifted so the largest is 0, in float16.

With C <= `topk` classes every label is exact (`logit` f2[C]), in both versions. Otherwise:

- `rded-soft-labels/1`: per label the top `topk` classes (`index`, `logit`) and one `rest` value, the
  log-probability every other class gets when the remaining mass is spread evenly.
- `rded-soft-labels/2`: per image a `tail` basis f2[R, C]: row 0 the mean over the image's views and
  regions of their shifted log-probabilities (shifted again so its largest is 0), rows 1.. the leading
  principal directions of those log-probabilities (R = 1 + `relabel.tail_rank`). Per label the top
  `topk` classes (`index`, best first, and `gap` u1: class i's log-probability is
  -(gap[0] + ... + gap[i]) / 16, so gap[0] = 0), `rest` (the log of the remaining mass, relative to the
  top class) and `coef` f2[R]: with shape = coef @ tail, every other class j gets
  `rest + shape[j] - log(sum over the other classes i of exp(shape[i]))`, i.e. the image's tail shapes
  combined per label, carrying exactly the remaining mass. The encoder fits `coef` by least squares
  (with an intercept) of the label's own log-probabilities over the other classes on the basis.

Version 2 stores an image's view records, region records and tail as one member, column by column
(`encode_image_labels`); version 1 stored two members of records (views; regions).
"""

from __future__ import annotations

import io

import numpy as np
import zstandard

LABELS_FORMAT = "rded-soft-labels/2"
LABELS_MEMBER = "labels.npy.zst"  # version 2: one member per image (version 1: views.npy.zst, regions.npy.zst)
LABELS_FORMAT_V1 = "rded-soft-labels/1"
ZSTD_LEVEL = 19
GAP_STEP = 1 / 16  # nats per unit of a v2 `gap`
# v2 values are rounded to these steps before float16 (fewer distinct values compress better): the mean
# tail row, the principal rows, `rest`, `coef`
TAIL_STEP, BASIS_STEP, REST_STEP, COEF_STEP = 1 / 8, 1 / 16, 1 / 32, 1 / 128
FLOOR = 1000.0  # log-probabilities below -FLOOR (relative to the top) count as -FLOOR in tail fits


def label_fields(num_classes: int, topk: int, version: int = 2, tail_rank: int = 0) -> list[tuple]:
    k = min(topk, num_classes)
    if k == num_classes:
        return [("logit", "<f2", (num_classes,))]
    if version == 1:
        return [("index", "<u2", (k,)), ("logit", "<f2", (k,)), ("rest", "<f2")]
    return [("index", "<u2", (k,)), ("gap", "u1", (k,)), ("rest", "<f2"), ("coef", "<f2", (1 + tail_rank,))]


def view_dtype(factor: int, num_classes: int, topk: int, version: int = 2, tail_rank: int = 0,
               resolution: int | None = None) -> np.dtype:
    """A view record. Version 2 drops version 1's `view` (a view's index is its position) and stores `crop`
    as u1 when the image side (`resolution`) fits in a byte."""
    crop = "u1" if version == 2 and resolution is not None and resolution <= 255 else "<u2"
    return np.dtype(([("view", "<u2")] if version == 1 else [])
                    + [("col_perm", "u1", (factor,)), ("row_perm", "u1", (factor,)), ("crop", crop, (4,)),
                       ("flip", "u1")] + label_fields(num_classes, topk, version, tail_rank))


def region_dtype(num_classes: int, topk: int, version: int = 2, tail_rank: int = 0) -> np.dtype:
    return np.dtype([("cell", "u1")] + label_fields(num_classes, topk, version, tail_rank))


def needs_tail(records: np.ndarray) -> bool:
    """Whether records carry v2 partial labels, which decode against their image's tail."""
    return "coef" in records.dtype.names


def image_tail(*log_probs: np.ndarray, rank: int = 0) -> np.ndarray:
    """The v2 per-image tail basis, f2[1 + rank, C], from all the image's labels' log-probabilities
    (views, then regions): row 0 the mean of their shifted log-probabilities, shifted so its largest is
    0; row r the r-th principal direction of the shifted log-probabilities (right singular vector of
    their deviations from the mean, scaled by singular value / sqrt(labels), sign: its largest-magnitude
    entry positive)."""
    rows = np.concatenate([lp for lp in log_probs if len(lp)]).astype(np.float64)
    rows = np.maximum(rows - rows.max(axis=1, keepdims=True), -FLOOR)  # a class of probability 0 stays finite
    mean = rows.mean(axis=0)
    basis = [np.round((mean - mean.max()) / TAIL_STEP) * TAIL_STEP]
    if rank:
        _, sv, vt = np.linalg.svd(rows - mean, full_matrices=False)
        for r in range(rank):
            d = vt[r] * (sv[r] / np.sqrt(len(rows))) if r < len(sv) else np.zeros_like(mean)
            d = d if d[np.argmax(np.abs(d))] >= 0 else -d
            basis.append(np.round(d / BASIS_STEP) * BASIS_STEP)
    return np.stack(basis).astype(np.float16)


def _top(shifted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # stable sort, so equal values keep class order and the record is deterministic
    order = np.argsort(-shifted, axis=1, kind="stable")[:, :k]
    rest = np.ones(shifted.shape, bool)
    np.put_along_axis(rest, order, False, axis=1)
    return order, np.take_along_axis(shifted, order, axis=1), rest


def pack_labels(records: np.ndarray, log_probs: np.ndarray, tail: np.ndarray | None = None) -> None:
    """Fill the label fields of `records` from exact log-probabilities [n, C] (float32); v2 partial records
    (those with `coef`) need the image's `tail` basis (image_tail)."""
    num_classes = log_probs.shape[1]
    shifted = log_probs.astype(np.float64) - log_probs.max(axis=1, keepdims=True)
    if "index" not in records.dtype.names:
        records["logit"] = shifted.astype(np.float16)
        return
    k = records.dtype["index"].shape[0]
    order, top, rest = _top(shifted, k)
    records["index"] = order
    if not needs_tail(records):
        records["logit"] = top.astype(np.float16)
    else:  # quantised to GAP_STEP below the top, stored as steps between consecutive classes
        steps = np.round(-top / GAP_STEP)
        records["gap"] = np.minimum(np.diff(steps, axis=1, prepend=0.0), 255)
    # probabilities relative to the top class: the rest's mass is the sum over the other classes
    rest_mass = np.where(rest, np.exp(shifted), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        if not needs_tail(records):  # v1: the rest spread evenly
            records["rest"] = np.log(rest_mass / (num_classes - k)).astype(np.float16)
            return
        records["rest"] = (np.round(np.log(rest_mass) / REST_STEP) * REST_STEP).astype(np.float16)
    # v2: coef by least squares (with an intercept) of the label's log-probabilities over the rest on the basis
    basis = tail.astype(np.float64).reshape(-1, num_classes)
    design = np.concatenate([np.ones((num_classes, 1)), basis.T], axis=1)
    coef = np.zeros((len(shifted), len(basis)))
    for i in range(len(shifted)):
        fit, *_ = np.linalg.lstsq(design[rest[i]], np.maximum(shifted[i, rest[i]], -FLOOR), rcond=None)
        coef[i] = fit[1:]
    records["coef"] = (np.round(np.clip(coef, -1000, 1000) / COEF_STEP) * COEF_STEP).astype(np.float16)


def unpack_logits(records: np.ndarray, num_classes: int, tail: np.ndarray | None = None) -> np.ndarray:
    """Reconstructed logits [n, C] float32 (any shift of the log-probabilities). v1 and v2 records alike;
    v2 partial labels need their image's `tail` basis f2[R, C]."""
    if "index" not in records.dtype.names:
        return records["logit"].astype(np.float32)
    index = records["index"].astype(np.int64)
    rest = records["rest"].astype(np.float64)[:, None]
    if not needs_tail(records):  # v1: the top classes as stored, the rest spread evenly
        top = records["logit"].astype(np.float64)
        out = np.repeat(rest, num_classes, axis=1)
    else:  # v2: the top classes from their gaps, the rest shaped by the image's tail
        if tail is None:
            raise ValueError("rded-soft-labels/2 records with topk < classes decode against their image's tail")
        top = -np.cumsum(records["gap"].astype(np.float64), axis=1) * GAP_STEP
        shaped = records["coef"].astype(np.float64) @ tail.astype(np.float64).reshape(-1, num_classes)
        others = shaped.copy()
        np.put_along_axis(others, index, -np.inf, axis=1)
        peak = others.max(axis=1, keepdims=True)
        norm = peak + np.log(np.exp(others - peak).sum(axis=1, keepdims=True))
        out = rest + shaped - norm
    np.put_along_axis(out, index, top, axis=1)
    return out.astype(np.float32)


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


def encode_records(*arrays: np.ndarray) -> bytes:
    """One or more arrays as consecutive .npy files in one zstandard frame."""
    buf = io.BytesIO()
    for a in arrays:
        np.save(buf, a, allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buf.getvalue())


def decode_arrays(data: bytes) -> list[np.ndarray]:
    """Every .npy in a member, in order."""
    raw = zstandard.ZstdDecompressor().decompress(data)
    f, out = io.BytesIO(raw), []
    while f.tell() < len(raw):
        out.append(np.load(f, allow_pickle=False))
    return out


def _column(name: str, values: np.ndarray) -> np.ndarray:
    column = np.empty(len(values), [(name, values.dtype, values.shape[1:])])
    column[name] = values
    return column


def encode_image_labels(views: np.ndarray, regions: np.ndarray, tail: np.ndarray | None = None) -> bytes:
    """An image's labels as one member (version 2): every field a column of its own, a one-field structured
    array named `views.<field>` or `regions.<field>`, then with partial labels `tail` (R rows of f2[C]); the
    .npy files back to back in one zstandard frame. Columns compress better than records (a column's values
    are alike), and one member instead of two saves a tar header and its padding."""
    columns = [_column(f"{group}.{name}", records[name])
               for group, records in (("views", views), ("regions", regions)) for name in records.dtype.names]
    if tail is not None:
        columns.append(_column("tail", tail))
    return encode_records(*columns)


def decode_image_labels(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(view records, region records, tail or None) from a version-2 member; ValueError when malformed."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {"views": [], "regions": []}
    tail = None
    for column in decode_arrays(data):
        names = column.dtype.names or ()
        if len(names) != 1 or column.ndim != 1:
            raise ValueError(f"expected one-field columns, found an array of dtype {column.dtype}")
        group, _, field = names[0].partition(".")
        if names[0] == "tail":
            tail = column["tail"]
        elif group in groups and field:
            groups[group].append((field, column[names[0]]))
        else:
            raise ValueError(f"unknown column {names[0]!r}")
    records = []
    for group, fields in groups.items():
        lengths = {len(values) for _, values in fields}
        if len(lengths) != 1:
            raise ValueError(f"{group}: " + ("no columns" if not fields else f"columns of lengths {sorted(lengths)}"))
        rec = np.empty(lengths.pop(), [(field, values.dtype, values.shape[1:]) for field, values in fields])
        for field, values in fields:
            rec[field] = values
        records.append(rec)
    return records[0], records[1], tail


def decode_records(data: bytes) -> np.ndarray:
    """A member's first (in views members, only) array."""
    raw = zstandard.ZstdDecompressor().decompress(data)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def read_image_labels(members: dict[str, bytes], num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An image's stored view records and, for partial labels, its tail basis, from its members in a label
    shard (format 2: one member; format 1: views, then regions). ValueError when they are missing or do not
    read back whole."""
    if LABELS_MEMBER in members:
        views, _, tail = decode_image_labels(members[LABELS_MEMBER])
    elif "views.npy.zst" in members:
        views, tail = decode_records(members["views.npy.zst"]), None
    else:
        raise ValueError("no labels")
    if needs_tail(views):
        rank = views.dtype["coef"].shape[0] if views.dtype["coef"].shape else 1
        if tail is None or tail.shape != (rank, num_classes):
            raise ValueError(f"holds no tail basis of {rank} x {num_classes}")
    return views, tail
