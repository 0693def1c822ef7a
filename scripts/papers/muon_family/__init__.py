"""The Muon family: Polar Express, NorMuon and cautious weight decay against Muon (the arms of
recipes/muon_family_lm.yaml), and Polar Express's Newton-Schulz spectrum (arXiv 2505.16932)."""
