"""The `birkhoff` command: recipe loading and validation, rank start-up through torchrun."""
