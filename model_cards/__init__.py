"""The model card template, installed as package data (see model_cards/README.md)."""
