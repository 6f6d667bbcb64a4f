"""Networks: the backbone contract (Trunk), the Network mltl builds around it, freezing and fine-tuning methods."""
