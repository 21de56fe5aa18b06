"""methods/salad."""
