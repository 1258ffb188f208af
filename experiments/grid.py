"""The serial study runner: `python -m aaa_fast.study run CONFIG --executor local --max-retries 0`
(one run at a time, in the config's order of priority; a failed run is reported, not retried).

    python experiments/grid.py experiments/fmnist.json              # everything not finished yet
    python experiments/grid.py experiments/fmnist.json --seeds 0 --methods PGD-AT AAA-meta --dry-run

The study CLI's other options (--workers, --keep-checkpoints, ...) pass through; see
`python -m aaa_fast.study run --help` and aaa_fast/study/grid.py for the config's format.
"""
import sys

from aaa_fast.runtime import run_cli
from aaa_fast.study.__main__ import main

if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(["run", "--executor", "local", "--max-retries", "0", *sys.argv[1:]])))
