"""`python -m fewstep ...` is the `fewstep` command."""
from fewstep.cli import main

main()
