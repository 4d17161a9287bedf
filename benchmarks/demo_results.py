"""The README's results table: the digits demo over variants x bits x seeds, mean +- std.

Each cell runs the README's training command, ``python train.py --config
configs/default.py:<args> --workdir <out>/<variant>/bits<K>_seed<S>``, one at a time (the runs
use every core; running two side by side on fewer threads changes XLA's float32 sums). A cell
whose workdir already holds a final row is read, not rerun, so an interrupted sweep resumes.

  python benchmarks/demo_results.py [--out runs/results] [--bits 12,24,32,48,64] [--seeds 0,1,2]

Prints a Markdown table of query mAP@all (mean +- population std over seeds) and, as its last
line, one JSON object with every cell's values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

# name -> (config arguments, description); (b) is the baseline the others change one thing of.
VARIANTS = {
    "defaults": ("", "(b) our defaults: ste DSF, no ASPP, release defects off"),
    "release": ("release", "(a) every release-compat switch on (DSF release estimator too)"),
    "dsf_release": ("estimator=release", "(c) defaults but the release's DSF estimator"),
    "aspp": ("aspp", "(d) defaults plus the ASPP block"),
}


def final_row(workdir: Path) -> dict | None:
    """The run's final metrics row (the one with ``query_map``), or None if it has not ended."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finals = [r for r in rows if "query_map" in r]
    return finals[-1] if finals else None


def run_cell(out: Path, variant: str, bits: int, seed: int) -> float:
    workdir = out / variant / f"bits{bits}_seed{seed}"
    row = final_row(workdir)
    if row is None:
        args = ",".join(a for a in (VARIANTS[variant][0], f"bits={bits}", f"seed={seed}") if a)
        cmd = [
            sys.executable,
            "train.py",
            f"--config=configs/default.py:{args}",
            f"--workdir={workdir}",
        ]
        start = time.time()
        log = workdir.with_suffix(".log")
        workdir.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
        row = final_row(workdir)
        if row is None:
            raise RuntimeError(f"{workdir}: the run ended without a final row (see {log})")
        print(
            f"{variant} bits={bits} seed={seed}: {row['query_map']:.4f} ({time.time() - start:.0f} s)"
        )
    return float(row["query_map"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/results")
    p.add_argument("--bits", default="12,24,32,48,64")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    out = Path(args.out)
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    cells: dict[str, dict[int, list[float]]] = {v: {b: [] for b in bits} for v in variants}
    for s in seeds:  # seed-major: an interrupted sweep still covers every cell
        for v in variants:
            for b in bits:
                cells[v][b].append(run_cell(out, v, b, s))

    print()
    print(f"Query mAP@all, digits demo, mean +- std over seeds {args.seeds}:")
    print("| variant | " + " | ".join(f"{b} bits" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for v in variants:
        vals = [
            f"{statistics.fmean(cells[v][b]):.4f} +- {statistics.pstdev(cells[v][b]):.4f}"
            for b in bits
        ]
        print(f"| {VARIANTS[v][1]} | " + " | ".join(vals) + " |")
    figures = {
        f"{v}_bits{b}_query_map": [round(x, 6) for x in cells[v][b]] for v in variants for b in bits
    }
    report(figures)


if __name__ == "__main__":
    main()
