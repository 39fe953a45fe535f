"""The web demo driven in a real browser (`examples/app_screenshot.py`, tests/test_app_browser.py)."""
