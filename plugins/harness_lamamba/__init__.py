"""LaMamba-Diff backbones (Fu, Chen, Yu, arXiv 2408.02615)."""
