"""reports/speed_table.py: the README's speed table shows the numbers of the files it cites."""
import os
import re

import pytest

from reports.speed_table import CPU_REPORT, GPU_REPORT, ONNX_REPORT, ROWS, table_rows
from tests.conftest import ROOT


def numbers(cell: str) -> list[str]:
    return re.findall(r"\d[\d,.]*", cell)


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_the_speed_table_shows_its_files_numbers(readme):
    with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
        text = f.read()
    assert CPU_REPORT in text and GPU_REPORT in text and ONNX_REPORT in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| ") and "H200" in line)
    shown = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[header + 2:header + 2 + len(ROWS)]]
    for row, expected in zip(shown, table_rows()):
        assert [numbers(cell) for cell in row[1:]] == [numbers(cell) for cell in expected[1:]], row[0]


def test_the_faq_says_how_to_install_the_cpu_build_of_torch():
    for readme in ("README.md", "README.zh-CN.md"):
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in f.read()


def test_bench_prints_the_table_the_readme_shows(capsys):
    import bench
    assert bench.main(["--speed-table"]) is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("| figure |") and len(printed) == 2 + len(ROWS)
    assert [numbers(cell) for cell in printed[2].strip("|").split("|")[1:]] == [numbers(c) for c in table_rows()[0][1:]]
