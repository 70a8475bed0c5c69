"""Model building blocks. Layers that need step metadata read the forward context."""
