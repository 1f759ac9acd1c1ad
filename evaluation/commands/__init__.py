"""The command modules of `invedit` (cli.py dispatches to them)."""
