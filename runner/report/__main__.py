"""``python -m runner.report <sweep or run folder>`` (runner/report/table.py)."""
import sys

from runner.report.table import main

if __name__ == "__main__":
    sys.exit(main())
