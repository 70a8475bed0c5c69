"""Model definitions, their registry, and the safetensors loader."""
