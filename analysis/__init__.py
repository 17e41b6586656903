"""Analysis: read run files (or wandb) into pandas and draw the paper's figures with seaborn."""
