#!/usr/bin/env python3
"""Caption an image or answer a question about it with MAGMA (the command line: magma_ipu/cli.py)."""

import sys

from magma_ipu.cli import main

if __name__ == "__main__":
    sys.exit(main())
