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
