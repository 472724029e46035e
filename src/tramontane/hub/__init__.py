"""Models by name: the local store (pull, list, rm), resolving a MODEL argument, describing a model."""
