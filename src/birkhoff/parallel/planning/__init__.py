"""`birkhoff plan`: a memory, communication and time model of a recipe on a cluster that need
not exist here, built from the real model's parameter inventory (constructed on the meta
device) and the layouts the trainer runs."""
