"""`python -m nanolisa train|chat|eval|merge ...`: the same tools as the `nanolisa` command."""
from nanolisa.cli import main

main()
