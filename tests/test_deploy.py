"""The launch files in deploy/: they parse, the Kubernetes documents are valid against the API's schema
(the official client's models), and what they run exists: the image's entry point, `rded distill`'s flags
in the real CLI parser (with --resume, so that a scheduler's restart resumes), torchrun's flags in
torchrun's own parser. Offline and fast: nothing is applied to a cluster or submitted to Slurm."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml

from rded.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
JOB_YAML = DEPLOY / "kubernetes" / "job.yaml"
MULTINODE_YAML = DEPLOY / "kubernetes" / "multinode.yaml"
SBATCH = DEPLOY / "slurm" / "rded.sbatch"
LAUNCH_FILES = [JOB_YAML, MULTINODE_YAML, SBATCH]
RDZV_PORT = "29500"


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

def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script as words: continuation lines joined, comments dropped, split
    at ; & | && ||. The script given to `bash -c` is a word here; torchrun_argv opens it."""
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


def torchrun_argv(script: str) -> list[str]:
    """The arguments of the one torchrun a script runs (looked for inside `bash -c '...'` too)."""
    found = []
    for words in shell_commands(script):
        for i, word in enumerate(words):
            if word == "torchrun" or word.endswith("/torchrun"):
                found.append(words[i + 1:])
                break
            if re.search(r"(^|\s)torchrun\s", word):
                found.append(torchrun_argv(word))
                break
    assert len(found) == 1, f"one torchrun expected, found {len(found)}"
    return found[0]


def split_torchrun(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's own options, and what follows `-m rded`."""
    starts = [i for i in range(len(argv) - 1) if argv[i] in ("-m", "--module") and argv[i + 1] == "rded"]
    assert starts, f"torchrun does not run -m rded: {argv}"
    return argv[:starts[0]], argv[starts[0] + 2:]


def launches() -> dict[str, tuple[list[str] | None, list[str]]]:
    """Per launch: (torchrun's options or None, the arguments of `rded`)."""
    out = {}
    for path in (JOB_YAML, MULTINODE_YAML):
        for doc in documents(path):
            if doc["kind"] != "Job":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                command, args = c.get("command"), c.get("args", [])
                if command is None:  # the image's entry point, rded
                    out[f"{path.name}:{c['name']}"] = (None, args)
                    continue
                if command == ["torchrun"]:
                    argv = args
                else:
                    full = command + args
                    assert full[0] in ("bash", "sh", "/bin/bash", "/bin/sh") and full[1] == "-c", \
                        f"{path.name}: the container must run rded, torchrun, or a shell that runs torchrun"
                    argv = torchrun_argv(full[2])
                out[f"{path.name}:{c['name']}"] = split_torchrun(argv)
    out[SBATCH.name] = split_torchrun(torchrun_argv(SBATCH.read_text()))
    return out


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


def test_every_launch_file_runs_rded_distill():
    found = launches()
    assert {k.split(":")[0] for k in found} == {p.name for p in LAUNCH_FILES}
    for name, (_, rded_args) in found.items():
        assert rded_args[:1] == ["distill"], f"{name}: runs rded {rded_args[:1]}, not rded distill"


@pytest.mark.parametrize("name", sorted(launches()))
def test_rded_distill_flags_exist(name):
    """Every flag passed to `rded distill` is one of its parser's, and the arguments parse. --resume is
    left to the next test, which names it."""
    _, rded_args = launches()[name]
    parser = distill_parser()
    unknown = sorted(set(flags(rded_args[1:])) - option_strings(parser) - {"--resume"})
    assert not unknown, f"{name}: rded distill has no {unknown}"
    try:
        args = parser.parse_args(with_placeholders([a for a in rded_args[1:] if a != "--resume"]))
    except SystemExit:
        pytest.fail(f"{name}: rded {' '.join(rded_args)} does not parse")
    assert args.out and args.job


def test_every_launch_passes_resume_and_rded_distill_has_it():
    """A scheduler's restart (Kubernetes' retry, torchrun's --max-restarts, Slurm's requeue) must continue
    the run committed under --out, not start over or stop at the finished-output check."""
    for name, (_, rded_args) in launches().items():
        assert "--resume" in rded_args, f"{name}: rded distill without --resume"
    assert "--resume" in option_strings(distill_parser()), \
        "rded distill has no --resume flag (yet): the launch files depend on it"


@pytest.mark.parametrize("name", sorted(k for k, v in launches().items() if v[0] is not None))
def test_torchrun_flags_exist_and_parse(name):
    from torch.distributed.run import get_args_parser

    torchrun_opts, rded_args = launches()[name]
    parser = get_args_parser()
    unknown = sorted(set(flags(torchrun_opts)) - option_strings(parser))
    assert not unknown, f"{name}: torchrun has no {unknown}"
    try:
        args = parser.parse_args(with_placeholders(torchrun_opts + ["-m", "rded"] + rded_args))
    except SystemExit:
        pytest.fail(f"{name}: torchrun {' '.join(torchrun_opts)} does not parse")
    assert args.module and args.training_script == "rded" and args.training_script_args[0] == "distill"
    if not args.standalone:  # several nodes: the rendezvous the README describes, and restarts
        assert args.rdzv_backend == "c10d" and args.rdzv_endpoint.endswith(":" + RDZV_PORT)
        for needed in ("--nnodes", "--nproc-per-node", "--node-rank", "--max-restarts"):
            assert needed in torchrun_opts, f"{name}: torchrun without {needed}"


# ---- the details each scheduler needs -------------------------------------------------------------------------

def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("path", [JOB_YAML, MULTINODE_YAML], ids=lambda p: p.name)
def test_kubernetes_job_runs_the_image_as_it_needs(path):
    job = next(d for d in documents(path) if d["kind"] == "Job")
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
    _, rded_args = launches()[f"{path.name}:{container['name']}"]
    assert rded_args[1].startswith("/data/") and rded_args[rded_args.index("--out") + 1].startswith("/out/")


def test_multinode_rendezvous_is_pod_0_through_the_headless_service():
    service, job = documents(MULTINODE_YAML)
    spec = pod_spec(job)
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes
    assert service["spec"]["clusterIP"] == "None" and spec["subdomain"] == service["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    torchrun_opts, _ = launches()[f"{MULTINODE_YAML.name}:{container['name']}"]

    def value(flag: str) -> str:
        word = torchrun_opts[torchrun_opts.index(flag) + 1]
        return re.sub(r"\$\{?(\w+)\}?|\$\((\w+)\)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)

    assert value("--rdzv-endpoint") == f"{job['metadata']['name']}-0.{spec['subdomain']}:{RDZV_PORT}"
    assert value("--nnodes") == str(nodes)
    assert value("--node-rank") in ("$JOB_COMPLETION_INDEX", "$(JOB_COMPLETION_INDEX)", "${JOB_COMPLETION_INDEX}")


def test_scripts_pass_bash_n():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for doc in documents(MULTINODE_YAML):
        for c in doc["spec"]["template"]["spec"]["containers"] if doc["kind"] == "Job" else []:
            script = (c["command"] + c.get("args", []))[2]
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr


def test_slurm_script():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.M)
    for needed in ("--nodes", "--gpus-per-node", "--ntasks-per-node", "--requeue", "--signal"):
        assert needed in directives, f"no #SBATCH {needed}"
    # sbatch reads directives only up to the first command
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1) if line.strip() and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[first_command:])
    assert re.search(r'^RDZV_HOST=\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| head -n ?1\)', text, re.M)
    srun = [w for w in shell_commands(text) if w[0] == "srun"]
    assert len(srun) == 1 and any(re.search(r"(^|\s)torchrun\s", w) for w in srun[0])
    torchrun_opts, _ = launches()[SBATCH.name]
    assert "$RDZV_HOST:" + RDZV_PORT in torchrun_opts
    # the node rank is each node's, so it is expanded there, not by the batch script on the first node
    assert "$SLURM_NODEID" in torchrun_opts and re.search(r"bash -c '[^']*\$SLURM_NODEID", text)
