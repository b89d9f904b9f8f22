"""`python -m strategies.inprocess SOURCE MOUNTPOINT ...`: the same as `fusecsi fuse`."""

from __future__ import annotations

import argparse

from strategies.inprocess.options import add_filesystem_arguments, filesystem_options
from strategies.inprocess.serve import run_filesystem

parser = argparse.ArgumentParser(prog="python -m strategies.inprocess")
add_filesystem_arguments(parser)
raise SystemExit(run_filesystem(filesystem_options(parser.parse_args())))
