"""`rded bench` runs ours, the reference-style baseline and the observer ceiling on the same images."""

from __future__ import annotations

import json

from rded.cli import main


def test_bench_reports_all_three_on_the_same_images(write_job, tmp_path, capsys):
    job = write_job(relabel={"views": 2})
    assert main(["bench", str(job), "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["reference"]["images"] == result["ours"]["images"] > 0
    assert result["ceiling"]["patches_per_s"] > 0 and result["speedup_vs_reference"] > 0
    # the baseline really distils: IPC x classes images, stitched to S
    assert len(list((tmp_path / "b" / "reference").glob("*.jpg"))) == 2 * 3
    out = capsys.readouterr().out
    assert "reference: end to end" in out and "ceiling: observer only" in out


def test_bench_over_streamed_shards_needs_no_reference(write_job, data_dir, tmp_path, capsys):
    job = write_job(data={"train": f"pipe:cat {data_dir}/train-{{000000..000001}}.tar"})
    assert main(["bench", str(job), "--out", str(tmp_path / "b")]) == 2
    assert "--no-reference" in capsys.readouterr().err
    assert not (tmp_path / "b" / "ours").exists()
