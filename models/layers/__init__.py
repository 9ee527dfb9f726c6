"""Shared Flax building blocks the families are made of: linear layers and norms, attention, MLP, mixture of experts,
and the causal LM around a stack of decoder layers."""
