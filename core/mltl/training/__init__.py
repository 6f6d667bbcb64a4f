"""Training: the loop of one stage variant (and its checkpoints), and DDP under torchrun."""
