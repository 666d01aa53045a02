"""Trainer container: train, evaluate and export the MNIST CNN for one run."""
