"""Typed, validated configuration: the job file (TOML, with `--set section.key=value` overrides) and the
settings of every other command (eval, train-observer, bench, demo, slice).

Relative paths in a job file are resolved against the job file's own directory, so a job file can be
run from anywhere. Every problem is raised as one `JobError` naming the key, before any work starts.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import JobError, OptionError

class _Section(BaseModel):
    # Unknown keys are a mistake (a typo would otherwise silently keep a default), and so is a wrong type:
    # strict, so that `crops = true` or `seed = "0"` is an error rather than 1 and 0 (an integer is still a
    # float: `lr = 1`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Section):
    train: list[str] = Field(min_length=1, description="shard paths or brace patterns")
    classes: str | None = Field(None, description="classes.json: list of {index, name, [imagenet_index]}")
    class_subset: list[int] | None = Field(None, description="only these dataset class indices")
    broken_shards: Literal["fail", "skip"] = Field(
        "fail", description="a shard that breaks off (truncated tar, a stream that still fails after the "
                            "retries): fail the run (work kept, --resume continues), or skip: count its "
                            "unread samples as skipped, name it in the manifest, publish and exit 3")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class DistillConfig(_Section):
    method: Literal["rded", "random"] = Field(
        "rded", description="rded: scored patches stitched; random: a uniform random subset of whole images "
                            "(the centre square), the baseline RDED is measured against")
    ipc: int = Field(10, ge=1, description="distilled images per class")
    slices: list[int] | None = Field(None, description="nested tiers; default: those of 1, 10, 50 below ipc, then ipc")
    subset: int = Field(300, ge=1, description="images drawn per class before cropping (the authors' mipc)")
    crops: int = Field(5, ge=1, le=64, description="candidate patches per image (K)")
    factor: int = Field(2, ge=1, le=8, description="factor x factor patches per distilled image")
    resolution: int = Field(224, ge=8, le=4096, description="distilled image side S")
    score_mode: Literal["pad", "native"] = "pad"
    score_decimals: int = Field(4, ge=0, le=7, description="scores are ranked rounded to this many decimals")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.method == "random" and (self.factor != 1 or self.crops != 1):
            raise ValueError("distill.method = 'random' stores whole images: set factor = 1 and crops = 1")
        if self.resolution // self.factor < 4:
            raise ValueError(f"resolution {self.resolution} / factor {self.factor} leaves patches under 4 px")
        tiers = self.tiers
        if tiers != sorted(set(tiers)) or tiers[-1] != self.ipc or tiers[0] < 1:
            raise ValueError(f"slices must be increasing, positive and end with ipc={self.ipc}; got {tiers}")
        return self

    @property
    def tiers(self) -> list[int]:
        if self.slices is not None:
            return list(self.slices)
        return [t for t in (1, 10, 50) if t < self.ipc] + [self.ipc]

    @property
    def patches_per_image(self) -> int:
        return self.factor * self.factor

    @property
    def patch_size(self) -> int:
        return self.resolution // self.factor


class ObserverConfig(_Section):
    kind: str = Field(description="a registered observer (rded.observer.REGISTRY), checked before any work")
    arch: str | None = Field(None, description="torchvision architecture name (kind = torchvision)")
    weights: str | None = Field(None, description="state dict (torchvision) or TorchScript file")
    num_outputs: int | None = Field(None, ge=1, description="observer outputs; default 1000 (torchvision)")
    normalization: Literal["auto", "imagenet", "lite"] = Field(
        "auto", description="auto: lite for efficientnet-lite0, imagenet otherwise")
    class_map: Literal["identity", "imagenet_index"] = Field(
        "identity", description="dataset class i -> observer output i, or classes.json's imagenet_index")


class RefineConfig(_Section):
    """FADRM refinement of the stitched images (off by default); the defaults are the authors'."""

    enabled: bool = Field(False, description="optimise the stitched images against the observer(s) before relabelling")
    iterations: int = Field(2000, ge=1, description="total optimisation steps, split evenly across the resolutions")
    resolutions: list[int] = Field([200, 224, 200, 224], min_length=1,
                                   description="side of the optimised image in each stage")
    merge: float = Field(0.5, ge=0.0, le=1.0, description="alpha: x <- alpha x + (1 - alpha) original at each "
                                                          "stage boundary (none after the last stage)")
    lr: float = Field(0.25, gt=0, description="Adam learning rate (cosine to 0 over all iterations)")
    bn_weight: float = Field(0.01, ge=0, description="weight of the BN-statistics terms; 0 needs no BN layers")
    first_bn_multiplier: float = Field(10.0, ge=0, description="extra weight of the first BN layer")
    jitter: int = Field(32, ge=0, description="largest random roll per step, px")
    observers: list[ObserverConfig] = Field([], description="observers used in turn, one per iteration, in the "
                                                            "form of [observer]; empty: the job's observer")
    micro_batch: int = Field(256, ge=1, description="images per forward pass; a larger batch is split and its BN "
                                                   "statistics accumulated exactly; part of the numerics")
    bn_stats: Literal["observer", "data"] = Field(
        "observer", description="what the BN terms match: observer: each observer's running statistics; data: "
                                "each BN layer's input statistics measured over a seeded sample of the job's "
                                "train images (rded.bnstats)")
    bn_stats_images: int = Field(512, ge=1, description="bn_stats = data: source images sampled (the first in the "
                                                        "keyed draw order of the drawn subset)")

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "amp" in data:
            raise ValueError("refine.amp was replaced by runtime.precision (one policy for every model call)")
        return data

    @field_validator("resolutions")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if not 16 <= r <= 4096]
        if bad:
            raise ValueError(f"every resolution must be between 16 and 4096 px; got {bad}")
        return v

    @model_validator(mode="after")
    def _check(self) -> RefineConfig:
        if self.iterations % len(self.resolutions):
            raise ValueError(f"iterations ({self.iterations}) must split evenly across the "
                             f"{len(self.resolutions)} resolutions")
        return self

    @property
    def stage_iterations(self) -> int:
        return self.iterations // len(self.resolutions)

    @property
    def unrecorded(self) -> set[str]:
        """Keys left out of the run's records (and so of its identity) while they change nothing: the default
        bn_stats = observer records what a run did before the keys existed."""
        return set() if self.bn_stats == "data" else {"bn_stats", "bn_stats_images"}


class RelabelConfig(_Section):
    enabled: bool = Field(True, description="write soft-label shards beside the distilled shards")
    views: int = Field(300, ge=0, le=65535, description="training views labelled per image (one per epoch)")
    topk: int = Field(6, ge=1, le=65535, description="classes stored per label with their own log-probability "
                                                     "(the rest follow the image's tail shape); all when there "
                                                     "are at most topk or exact_classes")
    exact_classes: int = Field(16, ge=0, le=65535, description="labels store every class exactly when the data "
                                                               "set has at most this many classes")
    tail_rank: int = Field(1, ge=0, le=16, description="principal tail shapes per image beyond the mean one "
                                                       "(partial labels; each about 1.5 KB per image)")
    view_grid: int | None = Field(None, ge=1, le=8, description="grid shuffle of the training views (g x g strips "
                                                               "permuted); default: distill.factor")
    view_scale: list[float] | None = Field(None, min_length=2, max_length=2,
                                           description="RandomResizedCrop area scale [lo, hi] of the training views; "
                                                       "default: [1 / grid, 1]")

    @field_validator("view_scale")
    @classmethod
    def _scale(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"view_scale must be [lo, hi] with 0 < lo <= hi <= 1; got {v}")
        return v


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decoder: Literal["auto", "cpu", "mixed"] = Field("auto", description="DALI decoder; auto: mixed on CUDA")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="every model call: bf16 autocast or fp32, channels-last; auto: bf16 where the "
                            "hardware has native bf16 (CUDA, x86 with AVX-512 BF16 or AMX), else fp32")
    batch_size: int = Field(64, ge=1, description="images per decode batch (does not change results)")
    dali_threads: int = Field(2, ge=1, description="DALI CPU threads (does not change results)")
    score_batch: int = Field(32, ge=1, description="patches per observer call; part of the numerics")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images (W x H, from the header) are skipped "
                                                          "as too_large, never decoded")
    max_batch_pixels: int = Field(100_000_000, ge=1, description="source pixels decoded at once at most "
                                                                 "(bounds decode memory; does not change results)")
    progress: bool = True
    retries: int = Field(5, ge=0, le=100, description="retries of a failed http(s):// or pipe: read (5xx, 429, "
                                                      "a reset, a short read, a non-zero exit)")
    retry_backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubled for each next one "
                                                        "(at most 60), with a keyed jitter of up to +50 %")
    connect_timeout: float = Field(30.0, gt=0, description="seconds to connect to an http(s):// source")
    read_timeout: float = Field(60.0, gt=0, description="seconds a stream may stall before the read is retried")
    stream_deadline: float = Field(3600.0, gt=0, description="seconds one shard's stream may take in all, "
                                                            "retries included")
    dist_timeout: float = Field(1800.0, gt=0, description="seconds a torchrun rank waits for the others at a "
                                                         "collective before the run fails")
    threads: int = Field(0, ge=0, description="intra-op threads of every model call; 0: torch's default (the "
                                              "cores, or OMP_NUM_THREADS, which torchrun sets to 1)")

    @model_validator(mode="after")
    def _check(self) -> RuntimeConfig:
        if self.max_batch_pixels < self.max_pixels:
            raise ValueError(f"max_batch_pixels ({self.max_batch_pixels}) must be at least max_pixels "
                             f"({self.max_pixels}): one image of the largest allowed size must fit a batch")
        return self


class OutputConfig(_Section):
    shard_size: int = Field(1000, ge=1, description="distilled images per shard (a tier always starts a shard)")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    contact_sheet_classes: int = Field(50, ge=1, description="rows in contact-sheet.png at most: the first classes that have images")
    contact_sheet_images: int = Field(10, ge=1, description="images per row in contact-sheet.png at most")


class JobConfig(_Section):
    data: DataConfig
    distill: DistillConfig = DistillConfig()
    observer: ObserverConfig
    refine: RefineConfig = RefineConfig()
    relabel: RelabelConfig = RelabelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    base_dir: str = Field(".", description="directory that relative paths are resolved against (set by load)")

    @property
    def view_grid(self) -> int:
        """The grid shuffle of the training views (the authors': the stitching factor)."""
        return self.relabel.view_grid or self.distill.factor

    @property
    def view_scale(self) -> tuple[float, float]:
        """The training views' RandomResizedCrop scale (the authors': (1 / factor, 1))."""
        return (self.relabel.view_scale[0], self.relabel.view_scale[1]) if self.relabel.view_scale \
            else (1.0 / self.view_grid, 1.0)

    def path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def public_dict(self) -> dict[str, Any]:
        """The configuration as recorded in the manifest (no machine-specific base directory)."""
        d = self.model_dump(mode="json")
        d.pop("base_dir")
        if not self.refine.enabled:  # the default: a run without refinement records what it always did
            d.pop("refine")
        else:
            for key in self.refine.unrecorded:
                d["refine"].pop(key)
        for key in ("view_grid", "view_scale"):  # likewise for the authors' views
            if d["relabel"][key] is None:
                d["relabel"].pop(key)
        return d


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` with value parsed as a TOML value, or taken as a plain string."""
    if "=" not in item:
        raise JobError(f"--set {item}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [k.strip() for k in dotted.split(".")]
    if len(keys) < 2 or not all(keys):
        raise JobError(f"--set {item}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


# what a key of each type expects, in the job file's words (the sections are strict: no coercion)
_EXPECTED = {
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "too_short": "needs at least {min_length} item(s)",
}


def _toml_value(v: Any) -> str:
    """A value as it is written in TOML (`true`, `"0"`, `[1, 2]`), for messages."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "isoformat"):  # TOML dates and times
        return v.isoformat()
    return repr(v)


def _key_name(loc: tuple) -> str:
    """("refine", "observers", 0, "kind") -> refine.observers[0].kind"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _source_of(loc: tuple, source: str, overrides: list[tuple[str, list[str]]]) -> str:
    """Where the value at `loc` came from: the last `--set` that set it (or a table above it), else the
    job file; a problem of a whole table that a `--set` changed names both."""
    path = tuple(str(p) for p in loc)
    setting = [item for item, keys in overrides if tuple(keys) == path[:len(keys)]]
    if setting:
        return f"--set {setting[-1]}"
    touching = [item for item, keys in overrides if tuple(keys[:len(path)]) == path]
    if touching and len(path) >= 2:  # a key that a --set made a table, by setting a key under it
        return f"--set {touching[-1]}"
    if touching:
        return f"{source} with " + ", ".join(f"--set {item}" for item in touching)
    return source


def _format_validation(err: ValidationError, source: str, overrides: list[tuple[str, list[str]]] = ()) -> str:
    """One line per problem, `SOURCE: key: what is wrong, got VALUE`, SOURCE being the job file or the
    `--set section.key=value` that gave the value."""
    problems = []
    for e in err.errors():
        kind, value = e["type"], e["input"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind in _EXPECTED:
            msg = _EXPECTED[kind].format(**e.get("ctx", {}))
        elif kind == "literal_error":
            msg = f"expected {e['ctx']['expected']}"
        else:
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind not in ("missing", "extra_forbidden") and not isinstance(value, dict):
            msg += f", got {_toml_value(value)}"
        problems.append(f"{_source_of(e['loc'], source, list(overrides))}: {_key_name(e['loc'])}: {msg}")
    if len(problems) == 1:
        return problems[0]
    return f"invalid job ({len(problems)} problems):\n" + "\n".join(f"  {p}" for p in problems)


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise JobError(f"{path}: not valid TOML: {e}") from None
    return job_from_dict(raw, base_dir=path.resolve().parent, overrides=overrides, source=str(path))


def job_from_dict(raw: dict[str, Any], *, base_dir: Path, overrides: list[str] = (),
                  source: str = "job") -> JobConfig:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    applied: list[tuple[str, list[str]]] = []
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise JobError(f"--set {item}: {'.'.join(keys[:i + 1])} is not a table")
        node[keys[-1]] = value
        applied.append((item, keys))
    if "base_dir" in raw:
        raise JobError(f"{source}: base_dir is not a job key")
    try:
        return JobConfig.model_validate({**raw, "base_dir": str(base_dir)})
    except ValidationError as e:
        raise JobError(_format_validation(e, source, applied)) from None


# -- the other commands' settings (the command line fills them from its flags)

class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_C = TypeVar("_C", bound=_Command)


class SliceConfig(_Command):
    run: Path = Field(description="a finished run")
    ipc: int = Field(ge=1, description="one of the run's tiers")
    out: Path
    overwrite: bool = False


class ExportConfig(_Command):
    run: Path = Field(description="a finished run or slice")
    format: Literal["imagefolder", "ddranking", "arrays"] = Field(description="the layout (docs/export.md)")
    out: Path = Field(description="an absent or empty directory, or a previous export with overwrite")
    overwrite: bool = Field(False, description="replace the previous export in out (only the files it lists)")


class EvalConfig(_Command):
    distilled: Path = Field(description="a finished run or slice")
    val: list[str] = Field(min_length=1, description="validation shard paths or brace patterns")
    student: str = "resnet18"
    epochs: int = Field(300, ge=1)
    resolution: int | None = Field(None, ge=8, description="training and validation side; default: the run's S")
    batch_size: int | None = Field(None, ge=1, description="default: the authors' (10/50/100 at IPC 1/10/50)")
    lr: float | None = Field(None, gt=0, description="default: the authors' for the student family")
    temperature: float = Field(20.0, gt=0)
    schedule: Literal["cosine", "authors"] = "cosine"
    labels: Literal["stored", "online", "hard"] = "stored"
    teacher_job: Path | None = Field(None, description="the job file whose observer labels online")
    seed: int = Field(0, ge=0)
    workers: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    out: Path | None = Field(None, description="also write the result JSON here")
    checkpoint: Path | None = Field(None, description="the training checkpoint; default: --out with suffix .ckpt")
    checkpoint_every: int = Field(10, ge=1, description="epochs between checkpoints (and one after the last)")
    resume: bool = Field(False, description="continue the training saved in the checkpoint, if there is one")
    best_of_per_class: int = Field(50, ge=0, description="val images per class of the best-of checks; 0: none")
    progress: bool = True

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint or (self.out.with_suffix(".ckpt") if self.out else None)


class TrainObserverConfig(_Command):
    train: list[str] = Field(min_length=1, description="training shard paths or brace patterns")
    num_classes: int = Field(ge=1)
    arch: str = "resnet18"
    epochs: int = Field(30, ge=1)
    resolution: int = Field(224, ge=8)
    batch_size: int = Field(64, ge=1)
    lr: float | None = Field(None, gt=0)
    val: list[str] | None = None
    seed: int = Field(0, ge=0)
    workers: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    out: Path
    progress: bool = True


class BenchConfig(_Command):
    job: Path
    overrides: list[str] = []
    out: Path = Field(description="working directory for the runs and bench.json")
    reference: bool = Field(True, description="also run the reference-style baseline")
    precisions: list[Literal["auto", "fp32", "bf16"]] = Field(
        ["fp32", "auto"], min_length=1, description="the job and the ceiling run once in each (duplicates "
                                                     "after resolving auto run once)")


class DemoConfig(_Command):
    out: Path = Path("rded-demo")
    train_steps: int = Field(1000, ge=1, description="observer training steps (a fixed count: reproducible)")
    seed: int = Field(0, ge=0)


def command_config(model: type[_C], values: dict[str, Any]) -> _C:
    """A command's settings, validated; the first problem is an OptionError naming its field."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        option = str(err["loc"][0]) if err["loc"] else "(settings)"
        raise OptionError(option, f"{err['msg']} (got {err['input']!r})") from None
