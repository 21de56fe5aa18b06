"""``python -m salad_med`` runs the CLI."""

from salad_med.cli import main

main()
