"""Spec -> nn.Module with sha256-verified weights; checks, conversion, the ONNX export cache."""
