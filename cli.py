"""Command-line plumbing shared by the scripts: argparse with every default in --help, one-line
errors for bad input, and the rank torchrun gives this process."""
import argparse
import os
import re
import sys
import time

# torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `python train.py` is one rank of one.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # argparse takes "-1" and "-.5" as numbers but "-1e-4" as an option name; these take all three
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # one line, not the whole usage block
        sys.exit(f"{self.prog}: error: {message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # options defaulting to None say in words what they default to
        return action.help if action.default is None else super()._get_help_string(action)


def fail(msg):
    """A one-line error for bad input: no traceback, nothing lost. Under torchrun every rank stops;
    rank 0 says why (the ranks check the same things)."""
    if RANK != 0:
        # torchrun stops every rank once one exits: a rank that left first could cut rank 0 off before
        # it printed why. So the others wait; rank 0's exit ends them (the wait is a bound, not a cost).
        time.sleep(60)
        sys.exit(1)
    sys.exit(f"error: {msg}")
