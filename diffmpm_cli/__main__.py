"""`python -m diffmpm_cli ...` is the `diffmpm` command (the same entry: Ctrl-C while it loads is one line)."""

from .entry import main

main()
