"""Wall time per stage of a make target (the demos), printed as a table at the end.

python -m core.stage_times FILE LABEL -- CMD...   run CMD; on success append "LABEL<TAB>SECONDS" to FILE
python -m core.stage_times FILE --start           begin a new record (FILE is this tool's own; nothing else)
python -m core.stage_times FILE --report          print each stage's time and the total
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    if argv[1] == "--start":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return 0
    if argv[1] == "--report":
        rows = [line.split("\t") for line in path.read_text().splitlines() if line]
        total = sum(float(s) for _, s in rows)
        width = max([len(label) for label, _ in rows] + [5])
        print("\nwall time per stage:")
        for label, seconds in rows:
            print(f"  {label:<{width}}  {float(seconds):7.1f} s")
        print(f"  {'total':<{width}}  {total:7.1f} s ({total / 60:.1f} min)")
        return 0
    label, rest = argv[1], argv[2:]
    if rest[:1] != ["--"] or len(rest) < 2:
        print(f"expected: {path} {label} -- CMD...", file=sys.stderr)
        return 2
    start = time.perf_counter()
    code = subprocess.call(rest[1:])
    if code == 0:
        with path.open("a") as f:
            f.write(f"{label}\t{time.perf_counter() - start:.1f}\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
