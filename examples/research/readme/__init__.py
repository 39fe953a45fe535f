"""The README's generated tables (`examples/update_readme.py`)."""
