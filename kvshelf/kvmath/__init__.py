"""Tensor primitives with no kvshelf dependency: rotary position embeddings and strided device copies.

Every other package may import this one; it imports nothing from kvshelf.
"""
