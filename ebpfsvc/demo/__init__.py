"""`make demo`: a two-node lab, the seed documents' Services, real traffic, readable tables
(run.py; its command is ebpfsvc/cli/demo.py; client.py runs inside the lab's pods)."""
