"""The model: loading ESM-2, its precision and RoPE state, the built-in packed forward and attention backends."""
