"""``imago plugins``: what is installed, and what failed to load."""

from __future__ import annotations

import argparse
import json

from ..plugin import manager as _plugins

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago plugins``."""
    parser.add_argument("--output", choices=("human", "json"), default="human", help="output format")


def run(args: argparse.Namespace) -> int:
    """Print one block per plugin; exit status 1 if any failed to load."""
    infos = sorted(_plugins.plugins(), key=lambda info: info.name)
    if args.output == "json":
        print(
            json.dumps(
                [
                    {
                        "name": info.name,
                        "distribution": info.distribution,
                        "version": info.version,
                        "storage-drivers": list(info.storage_drivers),
                        "format-drivers": list(info.format_drivers),
                        "cli-commands": list(info.cli_commands),
                        "error": None if info.error is None else str(info.error),
                    }
                    for info in infos
                ],
                indent=4,
            )
        )
    else:
        for info in infos:
            source = f"{info.distribution} {info.version}" if info.distribution else "registered in-process"
            print(f"{info.name} ({source})")
            if info.storage_drivers:
                print(f"    storage drivers: {', '.join(info.storage_drivers)}")
            if info.format_drivers:
                print(f"    format drivers:  {', '.join(info.format_drivers)}")
            if info.cli_commands:
                print(f"    commands:        {', '.join(info.cli_commands)}")
            if info.error is not None:
                print(f"    ERROR: {info.error.reason}")
        if not infos:
            print("no plugins installed")
    return 1 if any(info.error is not None for info in infos) else 0
