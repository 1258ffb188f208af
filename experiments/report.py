"""The study report: `python -m aaa_fast.study report CONFIG ...` (aaa_fast/study/report.py).

    python experiments/report.py experiments/fmnist.json --markdown docs/RESULTS.md README.md --figures docs/figures
"""
import sys

from aaa_fast.runtime import run_cli
from aaa_fast.study.report import main

if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(argv)))
