"""Differential privacy at a site: DP-SGD with Opacus made exact on the EchoCare Swin, and the site's ledger."""
