import subprocess
import sys

from core.stage_times import main


def test_each_stage_is_timed_and_a_failed_stage_stops_the_target(tmp_path, capsys):
    times = tmp_path / "runs" / "stage_times.tsv"
    assert main([str(times), "--start"]) == 0
    assert main([str(times), "sleep", "--", sys.executable, "-c", "import time; time.sleep(0.3)"]) == 0
    assert main([str(times), "quick", "--", sys.executable, "-c", "pass"]) == 0
    # a failing stage passes its exit code on (make stops) and is not recorded as done
    assert main([str(times), "broken", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    rows = [line.split("\t") for line in times.read_text().splitlines()]
    assert [label for label, _ in rows] == ["sleep", "quick"]
    assert float(rows[0][1]) >= 0.3
    capsys.readouterr()
    assert main([str(times), "--report"]) == 0
    report = capsys.readouterr().out
    assert "sleep" in report and "quick" in report and "total" in report and "broken" not in report
    assert main([str(times), "x", sys.executable]) == 2  # no "--": a usage error, nothing run
    # as make runs it
    done = subprocess.run(
        [sys.executable, "-m", "core.stage_times", str(times), "--report"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "min)" in done.stdout
