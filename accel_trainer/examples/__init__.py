"""Runnable examples, each usable from a YAML config (``configs/``) or from Python.

- :mod:`accel_trainer.examples.digits`: scikit-learn's 8x8 handwritten digits — a
  classifier (``DigitsClassifier``) and a GAN (``DigitsGAN``) with the seed's two-optimizer
  set-up, both trained by :class:`DigitsDataModule`.
"""
