import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The `browser` fixture (a real headless Chromium) for tests of web pages.
pytest_plugins = ["browser"]
