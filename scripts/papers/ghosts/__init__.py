"""Ghosts of Softmax (P. Sao, arXiv 2603.13552): the lr-spike experiment and the failure onset."""
