"""Differential privacy at the site: DP-SGD steps, Opacus accounting, the privacy ledger."""
