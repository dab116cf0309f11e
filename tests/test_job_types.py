"""Wrong types in a job are errors, as wrong values are: `crops = true` is not 1, `seed = "0"` is not 0,
`progress = "no"` is not false. An integer is still a number (`lr = 1`), and lists and choices work as
before. A bad value names its key and where it came from: the job file, or the `--set` that gave it."""

from __future__ import annotations

import pytest

from rded.cli import main
from rded.config import load_job


def distill(*args: str) -> list[str]:
    return ["distill", *args]


@pytest.mark.parametrize("sections,line", [
    ({"distill": {"crops": True}}, "distill.crops: expected an integer, got true"),
    ({"distill": {"seed": "0"}}, 'distill.seed: expected an integer, got "0"'),
    ({"distill": {"ipc": 2.0}}, "distill.ipc: expected an integer, got 2.0"),
    ({"distill": {"slices": [1, True]}}, "distill.slices[1]: expected an integer, got true"),
    ({"runtime": {"progress": "no"}}, 'runtime.progress: expected true or false, got "no"'),
    ({"runtime": {"progress": 0}}, "runtime.progress: expected true or false, got 0"),
    ({"runtime": {"retry_backoff": True}}, "runtime.retry_backoff: expected a number, got true"),
    ({"runtime": {"read_timeout": "60"}}, 'runtime.read_timeout: expected a number, got "60"'),
    ({"relabel": {"enabled": "false"}}, 'relabel.enabled: expected true or false, got "false"'),
    ({"data": {"class_subset": ["0"]}}, 'data.class_subset[0]: expected an integer, got "0"'),
    ({"observer": {"num_outputs": True}}, "observer.num_outputs: expected an integer, got true"),
    ({"distill": {"score_mode": 1}}, "distill.score_mode: expected 'pad' or 'native', got 1"),
])
def test_a_wrong_type_in_the_job_file_exits_2_naming_the_file_and_key(write_job, tmp_path, capsys, sections, line):
    job = write_job(**sections)
    out = tmp_path / "o"
    rc = main(distill(str(job), "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"rded: error: {job}: {line}\n" == err
    assert not out.exists()


@pytest.mark.parametrize("setting,line", [
    ("distill.crops=true", "distill.crops: expected an integer, got true"),
    ('distill.seed="0"', 'distill.seed: expected an integer, got "0"'),
    ("runtime.progress=no", 'runtime.progress: expected true or false, got "no"'),
    ("runtime.threads=-1", "runtime.threads: must be at least 0, got -1"),
    ("distill.ipcc=3", "distill.ipcc: unknown key"),
])
def test_a_wrong_set_value_is_the_sets_error(write_job, tmp_path, capsys, setting, line):
    job = write_job()
    out = tmp_path / "o"
    rc = main(distill(str(job), "--out", str(out), "--set", setting))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err == f"rded: error: --set {setting}: {line}\n"
    assert str(job) not in err  # the file is not at fault
    assert not out.exists()


def test_the_last_set_of_a_key_is_the_one_named(write_job, tmp_path, capsys):
    rc = main(distill(str(write_job()), "--out", str(tmp_path / "o"),
                      "--set", "distill.crops=2", "--set", "distill.crops=true"))
    assert rc == 2
    err = capsys.readouterr().err
    assert err == "rded: error: --set distill.crops=true: distill.crops: expected an integer, got true\n"


def test_problems_from_the_file_and_a_set_are_each_named(write_job, tmp_path, capsys):
    job = write_job(distill={"crops": True})
    rc = main(distill(str(job), "--out", str(tmp_path / "o"), "--set", "runtime.progress=yes"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("rded: error: invalid job (2 problems):\n")
    assert f"  {job}: distill.crops: expected an integer, got true\n" in err
    assert '  --set runtime.progress=yes: runtime.progress: expected true or false, got "yes"\n' in err


def test_a_table_made_inconsistent_by_a_set_names_both(write_job, tmp_path, capsys):
    job = write_job()  # slices = [1, 2]
    rc = main(distill(str(job), "--out", str(tmp_path / "o"), "--set", "distill.ipc=3"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{job} with --set distill.ipc=3: distill: slices must be increasing" in err


def test_a_set_through_a_key_that_is_not_a_table(write_job, tmp_path, capsys):
    rc = main(distill(str(write_job()), "--out", str(tmp_path / "o"), "--set", "distill.ipc.x=1"))
    assert rc == 2
    assert "--set distill.ipc.x=1: distill.ipc is not a table" in capsys.readouterr().err


def test_right_types_still_load(write_job):
    """An integer is a number; lists, choices, strings and booleans from the file and from --set."""
    job = load_job(write_job(refine={"lr": 1, "merge": 1}, runtime={"retry_backoff": 2, "progress": False}),
                   ["distill.slices=[1, 3]", "distill.ipc=3", "distill.score_mode=native", "runtime.device=cpu",
                    "runtime.progress=true", "runtime.read_timeout=5", "refine.bn_weight=0"])
    assert job.refine.lr == 1.0 and isinstance(job.refine.lr, float) and isinstance(job.refine.merge, float)
    assert isinstance(job.runtime.retry_backoff, float) and isinstance(job.runtime.read_timeout, float)
    assert job.distill.tiers == [1, 3] and job.distill.score_mode == "native" and job.runtime.device == "cpu"
    assert job.runtime.progress is True and job.refine.bn_weight == 0.0


def test_an_integer_number_records_as_its_float(write_job):
    """`lr = 1` and `lr = 1.0` are the same job (the manifest and the resume identity record 1.0)."""
    a = load_job(write_job("a.toml", refine={"lr": 1}))
    b = load_job(write_job("b.toml", refine={"lr": 1.0, "enabled": False}))
    assert a.public_dict() == b.public_dict() and a.model_dump()["refine"]["lr"] == 1.0


def test_a_job_recorded_in_a_manifest_loads_again(write_job, tmp_path):
    """rded eval rebuilds the job from the manifest's JSON: the strict sections take what they wrote."""
    from rded.config import job_from_dict

    job = load_job(write_job(refine={"enabled": True, "iterations": 4, "resolutions": [32, 32]}))
    recorded = job.model_dump(mode="json")
    recorded.pop("base_dir")
    again = job_from_dict(recorded, base_dir=tmp_path)
    assert again.public_dict() == job.public_dict()
