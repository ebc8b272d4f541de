"""`python -m ciserver` is the `ciserver` command."""

from .cli import main

main()
