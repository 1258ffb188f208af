"""Study grids: `python -m aaa_fast.study run|status|report GRID.json` (see __main__), on Ray or a
local process pool. grid: what a grid runs; runner: one run; executors: how runs are scheduled;
report: the tables and plots of finished runs."""
from .grid import Cell, cells, command, finished, load_grid

__all__ = ["Cell", "cells", "command", "finished", "load_grid"]
