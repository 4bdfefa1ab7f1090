"""A handler module that exits while it is imported (test_faults_hardening.py)."""

import sys

sys.exit(0)
