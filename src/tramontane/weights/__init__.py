"""Weight file readers: bounds-checked, memory-mapped, producing tensors and metadata."""
