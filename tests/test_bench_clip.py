"""`spectra bench clip` runs, and its numbers say what the issue asks of the operators."""

import json

from megatron_spectra.cli.main import main


def test_bench_clip_measures_accuracy_and_matmuls(tmp_path, capsys):
    path = tmp_path / "clip.json"
    assert main(["bench", "clip", "--sizes", "48", "--repeats", "1", "--methods", "svd,accurate,paper-fp32",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr()
    assert "| 48x48 | accurate |" in printed.out
    assert "[1/2] 48x48: svd" in printed.err and "[2/2] 192x48: svd" in printed.err  # progress per shape, off the table
    rows = {(tuple(r["shape"]), r["method"]): r for r in json.loads(path.read_text())["rows"]}
    for shape in [(48, 48), (192, 48)]:
        accurate, paper = rows[shape, "accurate"]["ratios"], rows[shape, "paper-fp32"]["ratios"]
        assert all(r["error"] <= 1e-3 for r in accurate.values()), accurate
        assert paper["1000.0"]["error"] > 0.1  # the official 10 steps do not converge there
        # The official Gram + 10 steps x 3 + final product = 32, less the 3 products that are
        # exact in full fp32 (the first step's two with I, the last step's unread Y).
        assert paper["100.0"]["matmuls"] == 29 and accurate["100.0"]["matmuls"] <= 2 * 32
        assert rows[shape, "svd"]["ratios"]["1.0"]["svds"] == 1
