"""Task exporters (feature-extraction, text-classification, tensor, text-generation); the
contract is in base.py."""
