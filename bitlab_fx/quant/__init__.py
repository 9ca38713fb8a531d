"""Tensor math of the quantizers; never imports torch.fx."""
