"""The shape of a job id, in a module of its own so that the client commands check
ids without importing the spec models."""

from __future__ import annotations

import re

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
JOB_ID_RULE = "1-128 characters of letters, digits and . _ : - that start with a letter or digit"
