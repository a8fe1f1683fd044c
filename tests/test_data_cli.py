"""`senseflow prepare-data` on the command line: arguments, exit codes, and errors people can act on."""
from __future__ import annotations

from megatron_senseflow.data.shards import read_manifest
from megatron_senseflow.cli import main as cli_main
from tests.data_helpers import real_images, save_folder


def test_cli_prepare_data(tmp_path, capsys):
    src = save_folder(tmp_path / "src", real_images(names=("rocket",), variants=("full", "mirror")))
    out = tmp_path / "out"
    argv = ["prepare-data", "--input", str(src), "--out", str(out), "--resolution", "32", "--min-side", "256",
            "--workers", "1", "--max-shard-bytes", "1M"]
    assert cli_main(argv + ["--format", "folder"]) == 0
    assert read_manifest(out)["num_samples"] == 2
    assert "wrote 2 samples in 1 shards" in capsys.readouterr().out
    assert cli_main(argv) == 2
    assert "--format is required when writing shards" in capsys.readouterr().err
    assert cli_main(argv + ["--format", "folder", "--buckets", "4:x"]) == 2
    assert "aspect bucket '4:x' is not W:H" in capsys.readouterr().err


def test_min_side_follows_resolution_and_a_run_that_drops_most_inputs_says_so(tmp_path, capsys):
    # rocket is 427 x 640; its crops are 320 x 480
    src = save_folder(tmp_path / "src", real_images(names=("rocket",), variants=("full", "crop_top_left",
                                                                                   "crop_bottom_right")))
    argv = ["prepare-data", "--input", str(src), "--format", "folder", "--workers", "1"]
    assert cli_main(argv + ["--out", str(tmp_path / "a"), "--resolution", "32"]) == 0  # no --min-side: 32
    out = capsys.readouterr().out
    assert "wrote 3 samples" in out and "only" not in out, out
    assert cli_main(argv + ["--out", str(tmp_path / "b"), "--resolution", "400"]) == 0  # --min-side 400
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote 1 samples") and "only 1 of 3 inputs were kept" in last, last
    assert "--min-side (400)" in last, last
