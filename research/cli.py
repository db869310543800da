"""What the command lines share: an argument parser whose errors are one line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that reports a bad argument in one line and exit status 2 instead of the usage
    block, as the command lines report every other error: `--bogus` reads
    `prog: error: unrecognized arguments: --bogus` (--help still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
