"""salad-med benchmarks: speed, memory and accuracy targets measured side by side (not timed tests)."""
