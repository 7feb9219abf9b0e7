import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The `browser` fixture (a real headless Chromium) for tests of web pages.
pytest_plugins = ["browser"]

# Tests carry no timing assertions, and Hypothesis' deadline and "too slow" health
# check are timing assertions: on a loaded CI host they fail tests whose behaviour is
# right. Each property test still sets its own number of examples.
settings.register_profile("p2psched", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("p2psched")
