"""The benchmarks' shared results header and report writers (``benchmarks/reporting.py``), and
the reports of the real-data benchmarks rendered again from their committed results."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_python

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/<script>.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import continual_real  # noqa: E402
import reporting  # noqa: E402
import single_task  # noqa: E402

#: Scripts no other smoke test starts as ``python benchmarks/<script>.py`` (tune.py and compare.py's
#: workers are started so in their own tests).
SCRIPTS = ("compare.py", "scale.py", "continual_real.py", "single_task.py", "profile_inference.py")


def test_command_line_records_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert reporting.command_line("tune.py", ["--set", "a.b=it's"]) == "python benchmarks/tune.py --set 'a.b=it'\"'\"'s'"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert reporting.command_line("scale.py", ["--tasks", "15"]) == "OMP_NUM_THREADS=2 python benchmarks/scale.py --tasks 15"


def test_run_meta_and_finish_meta() -> None:
    start = time.perf_counter()
    meta = reporting.finish_meta(reporting.run_meta("x.py", ["--a"]), start)
    assert {"command", "date", "machine", "threads", "OMP_NUM_THREADS", "torch", "python"} <= set(meta)
    assert meta["command"].endswith("python benchmarks/x.py --a")
    assert "CPU cores" in meta["machine"] and meta["threads"] >= 1
    assert meta["wall_seconds"] >= 0 and meta["peak_rss_mib_self"] > 50 and meta["peak_rss_mib_children"] >= 0
    line = reporting.header_line(meta)
    assert line.startswith(f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, ")
    assert "torch thread(s); whole run 0.0 min, peak RSS " in line


def test_header_line_of_results_written_before_the_helper() -> None:
    old = {"command": "python benchmarks/scale.py", "date": "2026-11-30", "machine": "x86_64, 2 CPU cores, no GPU"}
    assert reporting.header_line(old) == "Command: `python benchmarks/scale.py` (2026-11-30, x86_64, 2 CPU cores, no GPU)."
    assert reporting.header_line({**old, "threads": 1, "wall_minutes": 8.2}).endswith(
        "no GPU, 1 torch thread(s); whole run 8.2 min)."
    )


def test_markdown_table_and_memory() -> None:
    assert reporting.markdown_table(("a", "b"), [(1, ""), ("x", 2.5)]) == ["| a | b |", "|---|---|", "| 1 | |", "| x | 2.5 |"]
    assert reporting.current_rss_mib() > 50
    assert reporting.peak_rss_mib()["self"] >= reporting.current_rss_mib() * 0.5


def test_save_figure_writes_a_png(tmp_path: Path) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert reporting.save_figure(fig, tmp_path / "sub" / "f.png") == "f.png"
    assert (tmp_path / "sub" / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # closed


@pytest.mark.parametrize(("module", "name"), [(continual_real, "continual_real"), (single_task, "single_task")])
def test_committed_results_render_the_same_tables(module: object, name: str) -> None:
    """The committed JSON renders to the committed markdown's tables (the header line is the shared one now)."""
    data = json.loads((BENCHMARKS / "results" / f"{name}.json").read_text())
    committed = (BENCHMARKS / "results" / f"{name}.md").read_text().splitlines()
    rendered = module.markdown(data).splitlines()  # type: ignore[attr-defined]
    assert rendered[2].startswith(f"Command: `{data['meta']['command']}` ({data['meta']['date']}, ")
    assert [x for x in rendered if x.startswith("|")] == [x for x in committed if x.startswith("|")]
    assert rendered[:2] == committed[:2] and rendered[3:] == committed[3:]


def test_every_script_runs_as_a_script() -> None:
    """``python benchmarks/<script>.py --help``: the sibling imports resolve without sys.path edits."""
    for script in SCRIPTS:
        proc = run_python([f"benchmarks/{script}", "--help"], cwd=REPO, timeout=120)
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        assert proc.stdout.startswith("usage: "), script


def test_write_results_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"meta": {"command": "x"}, "rows": [1, 2]}
    text = reporting.write_results(tmp_path / "out", "thing", data, lambda d: f"# rows {d['rows']}\n")
    assert json.loads((tmp_path / "out" / "thing.json").read_text()) == data
    assert (tmp_path / "out" / "thing.md").read_text() == text == "# rows [1, 2]\n"
    assert "# rows [1, 2]" in capsys.readouterr().out
