"""The launch files in deploy/: they parse, the Kubernetes documents are valid against the API's schema
(the official client's models), and what they run exists: the image's entry point, `rded distill`'s flags
in the real CLI parser (with --resume, so that a scheduler's restart resumes, and a --check run first),
torchrun's flags in torchrun's own parser. The scripts run here too, with stand-ins for rded, torchrun,
getent, srun and scontrol that record what they are given: the check stops a bad job with its exit code,
the DNS wait ends, the Slurm rendezvous port is the job's own. Offline and fast: nothing is applied to a
cluster or submitted to Slurm."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import time
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml
from kubernetes.utils import parse_quantity

from rded.cli import build_parser
from rded.config import job_from_dict, parse_override
from rded.errors import EXIT_BAD_JOB, EXIT_PUBLISHED_WITH_BROKEN_SHARDS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
JOB_YAML = DEPLOY / "kubernetes" / "job.yaml"
MULTINODE_YAML = DEPLOY / "kubernetes" / "multinode.yaml"
SBATCH = DEPLOY / "slurm" / "rded.sbatch"
LAUNCH_FILES = [JOB_YAML, MULTINODE_YAML, SBATCH]
RDZV_PORT = "29500"  # Kubernetes: each pod its own address; Slurm: a port per job


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---- Kubernetes: a document as the client's models, refusing keys a model does not know -------------------

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str,
              "date": str, "bytes": str}


def to_model(data, type_name: str, path: str):
    """`data` (from YAML) as `type_name` ("V1Job", "List[V1Container]", "Dict[str, str]", "str", ...: the
    client's openapi_types, both its old spelling list[...]/dict(str, ...) and its new one), recursively.
    Fails naming the path on a key the model does not know, a wrong type, or a missing required field (the
    models' own client-side validation, on construction)."""
    if m := re.fullmatch(r"(?:List|list)\[(.+)\]", type_name):
        assert isinstance(data, list), f"{path}: a list expected, got {data!r}"
        return [to_model(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(data)]
    if m := re.fullmatch(r"Dict\[str, (.+)\]|dict\(str, (.+)\)", type_name):
        assert isinstance(data, dict), f"{path}: a mapping expected, got {data!r}"
        return {k: to_model(v, m.group(1) or m.group(2), f"{path}.{k}") for k, v in data.items()}
    if type_name in PRIMITIVES:
        want = PRIMITIVES[type_name]
        assert isinstance(data, want) and not (want is int and isinstance(data, bool)), \
            f"{path}: {type_name} expected, got {data!r}"
        return data
    cls = getattr(k8s, type_name)
    assert isinstance(data, dict), f"{path}: a {type_name} mapping expected, got {data!r}"
    attr_of = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(attr_of))
    assert not unknown, f"{path}: {type_name} has no field {unknown}"
    fields = {attr_of[k]: to_model(v, cls.openapi_types[attr_of[k]], f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise AssertionError(f"{path}: not a valid {type_name}: {e}") from None


def validate(doc: dict):
    """A Kubernetes document as its model: apiVersion batch/v1 + kind Job -> V1Job."""
    version = doc["apiVersion"].split("/")[-1]
    return to_model(doc, version.capitalize() + doc["kind"], doc["kind"])


def test_the_validator_refuses_unknown_keys_and_missing_fields():
    job = documents(JOB_YAML)[0]
    validate(job)
    typo = yaml.safe_load(yaml.safe_dump(job))
    typo["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(AssertionError, match=r"containers\[0\].*no field \['volumeMount'\]"):
        validate(typo)
    nameless = yaml.safe_load(yaml.safe_dump(job))
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match=r"not a valid V1Container"):
        validate(nameless)
    wrong = yaml.safe_load(yaml.safe_dump(job))
    wrong["spec"]["backoffLimit"] = "3"
    with pytest.raises(AssertionError, match=r"backoffLimit: int expected"):
        validate(wrong)


@pytest.mark.parametrize("path", [JOB_YAML, MULTINODE_YAML], ids=lambda p: p.name)
def test_kubernetes_documents_are_valid(path):
    docs = documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    for doc in docs:
        validate(doc)
    assert [d["kind"] for d in docs] == (["Job"] if path == JOB_YAML else ["Service", "Job"])


# ---- what the launch files run ------------------------------------------------------------------------------

SHELLS = ("bash", "sh", "/bin/bash", "/bin/sh")


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script as words: continuation lines joined, comments dropped, split
    at ; & | && ||. The script given to `bash -c` is a word here; invocations() opens it."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, current = list(lex), []
        for word in words + [";"]:
            if word and set(word) <= set(";&|()"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


class Invocation:
    """One run of rded: torchrun's own options (None where rded runs by itself) and rded's arguments."""

    def __init__(self, torchrun: list[str] | None, args: list[str]):
        self.torchrun, self.args = torchrun, args

    @property
    def is_check(self) -> bool:
        return "--check" in self.args

    def __repr__(self) -> str:
        launcher = ["torchrun", *self.torchrun, "-m"] if self.torchrun is not None else []
        return " ".join(launcher + ["rded", *self.args])


def split_torchrun(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's own options, and what follows `-m rded`."""
    starts = [i for i in range(len(argv) - 1) if argv[i] in ("-m", "--module") and argv[i + 1] == "rded"]
    assert starts, f"torchrun does not run -m rded: {argv}"
    return argv[:starts[0]], argv[starts[0] + 2:]


def invocations(words: list[str]) -> list[Invocation]:
    """The rded runs of one simple command, in order: rded itself, torchrun -m rded, and those of the
    script that `bash -c` is given (after srun and its options too)."""
    if words[:1] == ["exec"]:
        words = words[1:]
    if not words:
        return []
    program = words[0].rsplit("/", 1)[-1]
    if program == "rded":
        return [Invocation(None, words[1:])]
    if program == "torchrun":
        return [Invocation(*split_torchrun(words[1:]))]
    for i in range(len(words) - 2):
        if words[i] in SHELLS and words[i + 1] == "-c":
            return script_invocations(words[i + 2])
    return []


def script_invocations(script: str) -> list[Invocation]:
    return [inv for words in shell_commands(script) for inv in invocations(words)]


def job_containers() -> dict[str, dict]:
    """`file:container` -> the container, for every Job's pod."""
    return {f"{path.name}:{c['name']}": c for path in (JOB_YAML, MULTINODE_YAML) for doc in documents(path)
            if doc["kind"] == "Job" for c in doc["spec"]["template"]["spec"]["containers"]}


def container_words(container: dict) -> list[str]:
    """What the container runs, as words; no command: the image's entry point, rded."""
    command = container.get("command")
    return (["rded"] if command is None else command) + container.get("args", [])


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def launches() -> dict[str, list[Invocation]]:
    """Per launch (a Job's container, the Slurm script): its rded runs, in the order they run."""
    out = {name: invocations(container_words(c)) for name, c in job_containers().items()}
    out[SBATCH.name] = script_invocations(SBATCH.read_text())
    return out


def the_run(name: str) -> Invocation:
    runs = [inv for inv in launches()[name] if not inv.is_check]
    assert len(runs) == 1, f"{name}: one run of rded distill expected, found {runs}"
    return runs[0]


def the_check(name: str) -> Invocation:
    checks = [inv for inv in launches()[name] if inv.is_check]
    assert len(checks) == 1, f"{name}: one rded distill --check expected, found {checks}"
    return checks[0]


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """$X, ${X} and $(X) replaced by the container's env values where it sets them."""
    return [re.sub(r"\$(?:\{(\w+)\}|\((\w+)\)|(\w+))",
                   lambda m: env.get(m.group(1) or m.group(2) or m.group(3), m.group(0)), w) for w in words]


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def distill_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["distill"]


def flags(argv: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in argv if w.startswith("-")]


def with_placeholders(argv: list[str]) -> list[str]:
    """Shell and Kubernetes variables ($X, ${X}, $(X)) replaced by 0, so that the parsers check the rest."""
    return [re.sub(r"\$(\w+|\{\w+\}|\(\w+\))", "0", w) for w in argv]


def sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]


ALL_RUNS = sorted((name, i) for name, invs in launches().items() for i in range(len(invs)))


def test_every_launch_file_runs_rded_distill_checked_first():
    found = launches()
    assert {k.split(":")[0] for k in found} == {p.name for p in LAUNCH_FILES}
    for name, invs in found.items():
        assert all(inv.args[:1] == ["distill"] for inv in invs), f"{name}: runs {invs}, not rded distill"
        check, run = the_check(name), the_run(name)
        # the check runs first, by itself (no torchrun: it needs no rendezvous), on what the run will do
        assert [inv.is_check for inv in invs] == [True, False], f"{name}: the check must run before the job"
        assert check.torchrun is None, f"{name}: the check runs rded itself, not under torchrun"
        assert [a for a in check.args if a != "--check"] == run.args, f"{name}: the check and the run differ"


@pytest.mark.parametrize("name,index", ALL_RUNS, ids=[f"{n}-{i}" for n, i in ALL_RUNS])
def test_rded_distill_arguments_parse(name, index):
    """Every flag passed to `rded distill`, --check and --resume included, is one of its parser's, and the
    arguments parse."""
    inv = launches()[name][index]
    parser = distill_parser()
    unknown = sorted(set(flags(inv.args[1:])) - option_strings(parser))
    assert not unknown, f"{name}: rded distill has no {unknown}"
    try:
        args = parser.parse_args(with_placeholders(inv.args[1:]))
    except SystemExit:
        pytest.fail(f"{name}: rded {' '.join(inv.args)} does not parse")
    assert args.out and args.job and args.resume and args.check is inv.is_check


def test_every_launch_passes_resume():
    """A scheduler's restart (Kubernetes' retry, torchrun's --max-restarts, Slurm's requeue) must continue
    the run committed under --out, not start over or stop at the finished-output check; the check asks
    about the run that --resume would continue."""
    for name, invs in launches().items():
        for inv in invs:
            assert "--resume" in inv.args, f"{name}: {inv} without --resume"


@pytest.mark.parametrize("name", sorted(launches()))
def test_every_launch_asks_for_cuda_with_valid_job_keys(name):
    """The GPU launch files ask for CUDA, so that a node where CUDA is unusable fails (exit 2) instead of
    running the job on the CPU; every --set is a job key with a valid value. runtime.dist_timeout is left
    to the job file (default 1800 s)."""
    for inv in (the_check(name), the_run(name)):
        overrides = sets(inv.args)
        assert "runtime.device=cuda" in overrides, f"{name}: {inv} does not ask for runtime.device=cuda"
        assert all(len(parse_override(o)[0]) == 2 for o in overrides)
        job = job_from_dict({"data": {"train": "x.tar"}, "observer": {"kind": "torchscript"}}, base_dir=ROOT,
                            overrides=overrides, source=name)
        assert job.runtime.device == "cuda"


TORCHRUN_LAUNCHES = sorted(name for name in launches() if the_run(name).torchrun is not None)


@pytest.mark.parametrize("name", TORCHRUN_LAUNCHES)
def test_torchrun_flags_exist_and_parse(name):
    from torch.distributed.run import get_args_parser

    run = the_run(name)
    torchrun_opts, rded_args = run.torchrun, run.args
    parser = get_args_parser()
    unknown = sorted(set(flags(torchrun_opts)) - option_strings(parser))
    assert not unknown, f"{name}: torchrun has no {unknown}"
    try:
        args = parser.parse_args(with_placeholders(torchrun_opts + ["-m", "rded"] + rded_args))
    except SystemExit:
        pytest.fail(f"{name}: torchrun {' '.join(torchrun_opts)} does not parse")
    assert args.module and args.training_script == "rded" and args.training_script_args[0] == "distill"
    if not args.standalone:  # several nodes: the rendezvous the README describes, and restarts
        assert args.rdzv_backend == "c10d"
        endpoint = torchrun_opts[torchrun_opts.index("--rdzv-endpoint") + 1]
        # Kubernetes: every pod its own address, the Service's port; Slurm: a port of the job's own
        assert endpoint.endswith(":" + RDZV_PORT) if name != SBATCH.name else endpoint == "$RDZV_HOST:$RDZV_PORT"
        for needed in ("--nnodes", "--nproc-per-node", "--node-rank", "--max-restarts"):
            assert needed in torchrun_opts, f"{name}: torchrun without {needed}"


# ---- the details each scheduler needs -------------------------------------------------------------------------

def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def the_job(path: Path) -> dict:
    return next(d for d in documents(path) if d["kind"] == "Job")


K8S = [JOB_YAML, MULTINODE_YAML]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_job_runs_the_image_as_it_needs(path):
    job = the_job(path)
    spec = pod_spec(job)
    assert spec["restartPolicy"] in ("OnFailure", "Never") and isinstance(job["spec"].get("backoffLimit"), int)
    assert spec["securityContext"]["runAsUser"] == 1000  # the image's user
    (container,) = spec["containers"]
    image = container["image"]
    assert "." not in image.split("/")[0] and ":" in image, f"{image}: a placeholder name without a registry host"
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"].get("readOnly") is True
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert volumes[mounts["/out"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    rded_args = expand(the_run(f"{path.name}:{container['name']}").args, container_env(container))
    assert rded_args[1].startswith("/data/") and rded_args[rded_args.index("--out") + 1].startswith("/out/")


def qos_class(spec: dict) -> str:
    """The pod's QoS class, by Kubernetes' rule: Guaranteed when every container (init containers too) has
    CPU and memory limits equal to its requests, BestEffort when none has a CPU or memory request or limit."""
    containers = spec.get("initContainers", []) + spec["containers"]
    amounts = [(c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {}))
               for c in containers]
    if not any(r.get(k) or lim.get(k) for r, lim in amounts for k in ("cpu", "memory")):
        return "BestEffort"
    if all(lim.get(k) and parse_quantity(r.get(k, lim[k])) == parse_quantity(lim[k])
           for r, lim in amounts for k in ("cpu", "memory")):
        return "Guaranteed"
    return "Burstable"


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_pods_ask_for_cpu_and_memory(path):
    """Requests and limits: the scheduler places the pod where it fits, and the pod is Guaranteed, not
    BestEffort (the first evicted, and evictions do not count against backoffLimit: evicted without bound)."""
    spec = pod_spec(the_job(path))
    (container,) = spec["containers"]
    resources = container["resources"]
    for part in ("requests", "limits"):
        for key in ("cpu", "memory", "nvidia.com/gpu"):
            assert key in resources.get(part, {}), f"{path.name}: no {part}.{key}"
            assert parse_quantity(resources[part][key]) > 0
    assert qos_class(spec) == "Guaranteed"
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    # the memory-backed /dev/shm counts against the memory limit: it must leave room for the job
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"]
    assert parse_quantity(resources["limits"]["memory"]) >= 4 * parse_quantity(shm)


def test_qos_class_rule():
    bare = {"containers": [{"name": "a"}]}
    assert qos_class(bare) == "BestEffort"
    gpu_only = {"containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    assert qos_class(gpu_only) == "BestEffort"
    some = {"containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}]}
    assert qos_class(some) == "Burstable"
    both = {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}
    assert qos_class(both) == "Guaranteed"


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_failure_policy_and_deadline(path):
    """A deadline bounds the Job, retries included; exit codes that a retry cannot change (2: a bad job or
    refused resume; 3: published with broken shards skipped) fail the Job at once; evictions are ignored;
    the rest (1, 74, 75, 143) is retried up to backoffLimit."""
    job = the_job(path)
    deadline = job["spec"].get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and deadline >= 3600, f"{path.name}: no activeDeadlineSeconds of an hour or more"
    assert pod_spec(job)["restartPolicy"] == "Never"  # podFailurePolicy needs it
    (container,) = pod_spec(job)["containers"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    assert len(fail) == 1
    codes = fail[0]["onExitCodes"]
    assert codes["operator"] == "In" and codes.get("containerName") in (None, container["name"])
    assert codes["values"] == sorted(set(codes["values"])) and 0 not in codes["values"]  # the API's own rules
    assert {EXIT_BAD_JOB, EXIT_PUBLISHED_WITH_BROKEN_SHARDS} <= set(codes["values"])
    assert not {1, 74, 75, 143} & set(codes["values"])
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for r in ignore for c in r["onPodConditions"])


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_leaves_the_scripts_as_written(path):
    """Kubernetes expands $(NAME) of the container's env in command and args, and $$ to $: the scripts use
    neither, so the shell gets them as written."""
    (container,) = pod_spec(the_job(path))["containers"]
    env = container_env(container)
    for word in container_words(container):
        assert "$$" not in word and not [n for n in re.findall(r"\$\((\w+)\)", word) if n in env], word


def test_multinode_rendezvous_is_pod_0_through_the_headless_service():
    service, job = documents(MULTINODE_YAML)
    spec = pod_spec(job)
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes
    assert service["spec"]["clusterIP"] == "None" and spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"].get("publishNotReadyAddresses") is True
    assert [p["port"] for p in service["spec"]["ports"]] == [int(RDZV_PORT)]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["containers"]
    env = container_env(container)
    torchrun_opts = the_run(f"{MULTINODE_YAML.name}:{container['name']}").torchrun

    def value(flag: str) -> str:
        return expand([torchrun_opts[torchrun_opts.index(flag) + 1]], env)[0]

    assert value("--rdzv-endpoint") == f"{job['metadata']['name']}-0.{spec['subdomain']}:{RDZV_PORT}"
    assert env["SUBDOMAIN"] == spec["subdomain"]
    assert value("--nnodes") == str(nodes)
    assert value("--node-rank") in ("$JOB_COMPLETION_INDEX", "$(JOB_COMPLETION_INDEX)", "${JOB_COMPLETION_INDEX}")


def container_script(path: Path) -> str:
    (container,) = pod_spec(the_job(path))["containers"]
    words = container_words(container)
    assert words[0] in SHELLS and words[1] == "-c" and len(words) == 3, f"{path.name}: one bash -c script expected"
    return words[2]


def test_scripts_pass_bash_n():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for path in K8S:
        proc = subprocess.run(["bash", "-n", "-c", container_script(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr


def test_slurm_script():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.M)
    for needed in ("--nodes", "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--requeue", "--signal"):
        assert needed in directives, f"no #SBATCH {needed}"
    # sbatch reads directives only up to the first command
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1) if line.strip() and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[first_command:])
    assert re.search(r'^RDZV_HOST=\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| sed -n 1p\)', text, re.M)
    srun = [w for w in shell_commands(text) if w[0] == "srun"]
    assert len(srun) == 1 and any(re.search(r"(^|\s)torchrun\s", w) for w in srun[0])
    # Slurm 22.05 and later: srun does not take --cpus-per-task from sbatch, it must be given again
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in srun[0]
    torchrun_opts = the_run(SBATCH.name).torchrun
    assert "$RDZV_HOST:$RDZV_PORT" in torchrun_opts
    assert re.search(r"^RDZV_PORT=\$\(\(.*\bSLURM_JOB_ID\b.*\)\)", text, re.M)
    assert re.search(r"^export\b.*\bRDZV_PORT\b", text, re.M)
    # the node rank is each node's, so it is expanded there, not by the batch script on the first node
    assert "$SLURM_NODEID" in torchrun_opts and re.search(r"bash -c '[^']*\$SLURM_NODEID", text)


# ---- the scripts, run with stand-ins --------------------------------------------------------------------------

FAKE = {
    # rded: the check exits $FAKE_CHECK_RC, the job $FAKE_RUN_RC
    "rded": 'for a in "$@"; do [ "$a" = --check ] && exit "${FAKE_CHECK_RC:-0}"; done; exit "${FAKE_RUN_RC:-0}"',
    "torchrun": 'exit "${FAKE_RUN_RC:-0}"',
    # getent hosts NAME: resolves the names in $FAKE_DNS
    "getent": 'for n in $FAKE_DNS; do [ "$2" = "$n" ] && { echo "10.0.0.1 $n"; exit 0; }; done; exit 2',
    # scontrol show hostnames: a long node list, a line per write (as a pipe gets it from a big one)
    "scontrol": '[ "$1 $2" = "show hostnames" ] && for n in a b $(seq 3000); do echo "node-$n"; done; exit 0',
    # srun OPTIONS... COMMAND: runs COMMAND here (one task)
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"',
}


@pytest.fixture
def fake_bin(tmp_path):
    """A folder of stand-ins that append their name and arguments, one line each, to $FAKE_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        log = f'printf "%q " {name} "$@" >>"$FAKE_LOG"; echo >>"$FAKE_LOG"'
        (bin_dir / name).write_text(f"#!/bin/bash\n{log}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_with_fakes(argv: list[str], fake_bin: Path, env: dict[str, str], timeout: float = 30):
    """(exit code, stderr, the stand-ins' calls as word lists, seconds)."""
    log = fake_bin.parent / "calls.log"
    log.write_text("")
    full_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_LOG": str(log), "HOME": str(fake_bin.parent), **env}
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=fake_bin.parent)
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    return proc.returncode, proc.stderr, calls, time.monotonic() - started


def k8s_env(path: Path, **extra: str) -> dict[str, str]:
    (container,) = pod_spec(the_job(path))["containers"]
    return {**container_env(container), **extra}


@pytest.mark.parametrize("check_rc", [EXIT_BAD_JOB, 74])
def test_job_yaml_stops_with_the_checks_exit_code(fake_bin, check_rc):
    rc, _, calls, _ = run_with_fakes(["bash", "-c", container_script(JOB_YAML)], fake_bin,
                                     k8s_env(JOB_YAML, FAKE_CHECK_RC=str(check_rc)))
    assert rc == check_rc
    assert calls == [["rded", "distill", "/data/job.toml", "--out", "/out/run", "--resume",
                      "--set", "runtime.device=cuda", "--check"]]


def test_job_yaml_runs_the_job_after_the_check_with_its_exit_code(fake_bin):
    rc, _, calls, _ = run_with_fakes(["bash", "-c", container_script(JOB_YAML)], fake_bin,
                                     k8s_env(JOB_YAML, FAKE_RUN_RC=str(EXIT_PUBLISHED_WITH_BROKEN_SHARDS)))
    assert rc == EXIT_PUBLISHED_WITH_BROKEN_SHARDS  # the pod's exit code, for podFailurePolicy
    run = ["rded", "distill", "/data/job.toml", "--out", "/out/run", "--resume", "--set", "runtime.device=cuda"]
    assert calls == [run + ["--check"], run]


MULTINODE_POD_1 = dict(JOB_COMPLETION_INDEX="1", HOSTNAME="rded-multinode-1")


def test_multinode_checks_then_waits_for_pod_0_then_starts_torchrun(fake_bin):
    env = k8s_env(MULTINODE_YAML, **MULTINODE_POD_1, FAKE_DNS="rded-multinode-0.rded-multinode")
    rc, _, calls, _ = run_with_fakes(["bash", "-c", container_script(MULTINODE_YAML)], fake_bin, env)
    assert rc == 0
    assert [c[0] for c in calls] == ["rded", "getent", "torchrun"]
    assert calls[0][-1] == "--check" and calls[0][1:3] == ["distill", "/data/job.toml"]
    torchrun = calls[2]
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == f"rded-multinode-0.rded-multinode:{RDZV_PORT}"
    assert torchrun[torchrun.index("--node-rank") + 1] == "1" and torchrun[torchrun.index("--nnodes") + 1] == "2"
    assert torchrun[torchrun.index("rded") + 1:] == calls[0][1:-1]  # the job the check checked


def test_multinode_stops_with_the_checks_exit_code_before_any_wait(fake_bin):
    env = k8s_env(MULTINODE_YAML, **MULTINODE_POD_1, FAKE_CHECK_RC=str(EXIT_BAD_JOB), FAKE_DNS="")
    rc, _, calls, seconds = run_with_fakes(["bash", "-c", container_script(MULTINODE_YAML)], fake_bin, env)
    assert rc == EXIT_BAD_JOB and [c[0] for c in calls] == ["rded"] and seconds < 10


@pytest.mark.parametrize("dns,wait,rc,says", [
    ("", "0", EXIT_BAD_JOB, "no headless Service named rded-multinode selects these pods"),
    ("rded-multinode-1.rded-multinode", "0", 1, "pod 0 (rded-multinode-0.rded-multinode) did not resolve in 0 s"),
    ("", "2", EXIT_BAD_JOB, "after 2 s"),
], ids=["misnamed-service", "pod-0-not-running", "one-retry"])
def test_multinode_dns_wait_is_bounded(fake_bin, dns, wait, rc, says):
    """A Service that does not match (exit 2: no retry can fix it) or a pod 0 that does not come (exit 1, a
    retry) ends the wait after RDZV_DNS_WAIT seconds, with a message; torchrun is not started."""
    env = k8s_env(MULTINODE_YAML, **MULTINODE_POD_1, FAKE_DNS=dns, RDZV_DNS_WAIT=wait)
    code, err, calls, seconds = run_with_fakes(["bash", "-c", container_script(MULTINODE_YAML)], fake_bin, env)
    assert code == rc, err
    assert says in err and "torchrun" not in [c[0] for c in calls]
    assert seconds < int(wait) + 10


def test_multinode_waits_as_long_as_torchrun_does():
    assert int(k8s_env(MULTINODE_YAML)["RDZV_DNS_WAIT"]) == 600  # torchrun's rendezvous join timeout


def slurm_env(job_id: int, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
            "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "32", **extra}


def test_slurm_checks_then_runs_torchrun_on_a_port_of_the_job(fake_bin):
    ports = []
    for job_id in (4242, 4243, 14242):
        rc, err, calls, _ = run_with_fakes(["bash", str(SBATCH)], fake_bin, slurm_env(job_id))
        assert rc == 0, err
        names = [c[0] for c in calls]
        assert names == ["scontrol", "srun", "rded", "torchrun"], calls
        assert "--cpus-per-task=32" in calls[1]
        check, torchrun = calls[2], calls[3]
        assert check[-1] == "--check" and "runtime.device=cuda" in check
        endpoint = torchrun[torchrun.index("--rdzv-endpoint") + 1]
        host, port = endpoint.rsplit(":", 1)
        assert host == "node-a" and torchrun[torchrun.index("--rdzv-id") + 1] == str(job_id)
        assert 1024 <= int(port) < 32768, f"{port}: outside the unprivileged ports below Linux's ephemeral range"
        assert torchrun[torchrun.index("rded") + 1:] == check[1:-1]
        ports.append(int(port))
    assert len(set(ports[:2])) == 2, "two jobs in a row share their rendezvous port"


def test_slurm_stops_with_the_checks_exit_code(fake_bin):
    rc, _, calls, _ = run_with_fakes(["bash", str(SBATCH)], fake_bin, slurm_env(7, FAKE_CHECK_RC=str(EXIT_BAD_JOB)))
    assert rc == EXIT_BAD_JOB
    assert [c[0] for c in calls] == ["scontrol", "srun", "rded"]
