"""``python -m salad_med`` runs the CLI."""

from salad_med.cli.app import main

main()
