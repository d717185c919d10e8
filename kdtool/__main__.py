"""`python -m kdtool` (what torchrun starts) is the `kdtool` command."""

from kdtool.cli import main

main()
