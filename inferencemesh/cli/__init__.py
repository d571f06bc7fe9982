"""Command-line interface: ``python -m inferencemesh COMMAND``."""
