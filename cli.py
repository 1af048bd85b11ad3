"""LL-BCFL command line: ``python cli.py --help`` or the ``llbcfl`` script.

Each command group lives in its own module under ``commands/``; this file
only puts them together.
"""

from __future__ import annotations

import click

from commands.chain import chain
from commands.data import data
from commands.network import network
from commands.node import node_command
from commands.plot import plot
from commands.privacy import privacy
from commands.reproduce import reproduce
from commands.simulate import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """LL-BCFL: blockchain-assisted federated learning with local differential privacy."""


for command in (chain, data, network, node_command, plot, privacy, reproduce, simulate):
    main.add_command(command)


if __name__ == "__main__":
    main()
