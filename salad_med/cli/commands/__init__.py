"""CLI commands; each module registers its commands on :data:`salad_med.cli.app`."""
