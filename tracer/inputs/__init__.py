"""What goes in: sequences, packing arithmetic, sub-batches and planted faults (no model code)."""
