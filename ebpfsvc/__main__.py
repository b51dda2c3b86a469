"""`python -m ebpfsvc`: the `ebpfsvc` command."""

from ebpfsvc.cli import main

main()
