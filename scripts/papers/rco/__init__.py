"""RCO, exact budget constraints on a Riemannian manifold (Helcig & Alistarh 2026, arXiv
2605.00649): the synthetic knapsack and the mixed-precision bit-widths of the quickstart GPT."""
