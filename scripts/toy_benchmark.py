"""Toy quality benchmark -> docs/results.md. See fewstep/metrics/toy_report.py for the options."""
from fewstep.metrics.toy_report import main

if __name__ == "__main__":
    main()
