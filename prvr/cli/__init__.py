"""The command line, the top layer of prvr: `prvr COMMAND ...` or `python -m prvr.cli COMMAND ...`.

Nothing in prvr imports from here; each module registers one command group."""
from prvr.cli.app import build_parser, main
from prvr.cli.common import add_config_args, config_from_args

__all__ = ["main", "build_parser", "add_config_args", "config_from_args"]
