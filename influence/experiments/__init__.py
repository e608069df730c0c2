"""Experiments that check the scores against retrained models (e.g. :mod:`influence.experiments.lds`)."""
