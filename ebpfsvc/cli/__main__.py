"""`python -m ebpfsvc.cli`: the `ebpfsvc` command (the lab starts its agents this way)."""

from ebpfsvc.cli import main

main()
