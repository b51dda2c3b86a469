"""`make demo`: a two-node lab, the seed documents' Services, real traffic, readable tables."""

import click


@click.command("demo")
@click.option("--prefix", default="demo", show_default=True, help="Name prefix of the demo lab's namespaces.")
def demo(prefix: str) -> None:
    """Bring up a two-node lab, apply the seed documents' Services, send traffic, show what happened."""
    from ebpfsvc.demo.run import main

    main(prefix)
