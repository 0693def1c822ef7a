"""Private synthetic trajectories by MFLD (Gu, Chien & Greenewald, arXiv 2506.12203): the
epsilon sweep and the one-run audit of the generator."""
