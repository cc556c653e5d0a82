"""Offline compression: angular-distance layer pruning (Gromov et al. 2024) and, later, healing and evaluation."""
