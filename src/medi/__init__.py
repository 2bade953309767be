"""medi: metadata-guided diffusion models for mitigating biases in tumour classification."""

__version__ = "0.1.0"
