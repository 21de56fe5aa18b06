"""methods/components."""
