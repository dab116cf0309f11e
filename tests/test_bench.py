"""`rded bench` runs ours, the reference-style baseline and the observer ceiling on the same images."""

from __future__ import annotations

import json

from rded.cli import main


def test_bench_reports_all_three_on_the_same_images_in_each_precision(write_job, tmp_path, capsys):
    job = write_job(relabel={"views": 2})
    assert main(["bench", str(job), "--out", str(tmp_path / "b"), "--precision", "fp32", "--precision", "bf16"]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["precisions"] == ["fp32", "bf16"]
    for precision, run in result["runs"].items():
        assert result["reference"]["images"] == run["ours"]["images"] > 0
        assert run["ceiling"]["patches_per_s"] > 0 and run["speedup_vs_reference"] > 0
        assert run["ours"]["compute"]["precision"] == precision
        manifest = json.loads((tmp_path / "b" / f"ours-{precision}" / "manifest.json").read_text())
        assert manifest["precision"] == precision
    # the baseline really distils: IPC x classes images, stitched to S
    assert len(list((tmp_path / "b" / "reference").glob("*.jpg"))) == 2 * 3
    out = capsys.readouterr().out
    assert "reference (fp32): end to end" in out and "ceiling bf16: observer only" in out


def test_bench_over_streamed_shards_needs_no_reference(write_job, data_dir, tmp_path, capsys):
    job = write_job(data={"train": f"pipe:cat {data_dir}/train-{{000000..000001}}.tar"})
    assert main(["bench", str(job), "--out", str(tmp_path / "b")]) == 2
    assert "--no-reference" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("ours*"))
