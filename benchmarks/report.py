"""python -m benchmarks.report RESULTS.json: the Markdown table of a results file."""

import json
import sys

from benchmarks.__main__ import table

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)["results"]))
