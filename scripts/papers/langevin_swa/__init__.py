"""Langevin dynamics with stochastic weight averaging on a Gaussian single-index model (Wei,
Damian & Lee, arXiv 2603.06028): the scaling sweep and its report."""
